"""The ``ketch`` command: ``ketch serve`` runs the gateway and its workers, ``ketch worker``
joins a running gateway with one more worker (possibly from another machine), ``ketch
plugins`` lists the plugins and policies the gateway would load."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ketch.errors import KetchError
from ketch.httpserver import run_event_loop
from ketch.server import DEFAULT_BROKER, ServeOptions, serve
from ketch.zmq_transport.liveness import DEFAULT_INTERVAL_S, DEFAULT_LIVENESS, Heartbeat


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="what to log on stderr (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between heartbeats, both ways (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-liveness",
        type=_positive_int,
        default=DEFAULT_LIVENESS,
        metavar="N",
        help="a peer silent for N heartbeat intervals is dead (default %(default)s)",
    )


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="load this module or file as a plugin too (repeatable); installed plugins (the "
        "'ketch' entry-point group) load unless KETCH_DISABLE_PLUGIN_AUTOLOAD is set",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ketch", description="Serve models over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser("serve", help="serve the models of a file or module over HTTP")
    serve_cmd.add_argument(
        "source",
        metavar="PATH_OR_MODULE",
        nargs="?",
        help="the file or module with the models and applications, e.g. app.py or pkg.models",
    )
    serve_cmd.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=RUNTIME:PATH",
        help="also serve a saved model through a runtime, e.g. resnet=torch:model.pt2 "
        "(repeatable; `ketch plugins` lists the runtimes)",
    )
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="HTTP interface (default %(default)s)"
    )
    serve_cmd.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="HTTP port, 0 for any free port (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--broker",
        default=DEFAULT_BROKER,
        metavar="ENDPOINT",
        help="ZeroMQ endpoint workers connect to; tcp://0.0.0.0:7070 admits remote workers "
        "(default %(default)s)",
    )
    serve_cmd.add_argument(
        "--workers-per-model",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="keep at least N workers warm per model version, raising each model's "
        "min_replicas (default %(default)s: pools start at their min_replicas, often zero, "
        "and start workers on demand)",
    )
    serve_cmd.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="answer 504 when a request has no result after this long (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where applications keep their policies' state across restarts (default "
        "$KETCH_STATE_DIR, else ~/.local/state/ketch)",
    )
    _add_plugin_option(serve_cmd)
    _add_common_options(serve_cmd)

    plugins_cmd = commands.add_parser(
        "plugins", help="list the plugins and the policies they register"
    )
    _add_plugin_option(plugins_cmd)
    plugins_cmd.add_argument(
        "--reference",
        action="store_true",
        help="print the hooks a plugin can implement, with their documentation (Markdown)",
    )

    worker_cmd = commands.add_parser(
        "worker", help="serve one model as a worker of a running gateway"
    )
    worker_cmd.add_argument(
        "target",
        metavar="PATH_OR_MODULE[:name]",
        help="file or module with the model, and the model's name if it has several",
    )
    worker_cmd.add_argument(
        "--connect",
        default=DEFAULT_BROKER,
        metavar="ENDPOINT",
        help="the gateway's broker endpoint (default %(default)s)",
    )
    worker_cmd.add_argument("--model-version", default=None, help="which version to serve")
    _add_common_options(worker_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"),
        format="%(asctime)s ketch %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "plugins":
            if args.reference:
                from ketch.hookspecs import reference

                print(reference(), end="")
                return 0
            return _list_plugins(args.plugin)
        heartbeat = Heartbeat(args.heartbeat_interval, args.heartbeat_liveness)
        if args.command == "serve":
            options = ServeOptions(
                source=args.source,
                host=args.host,
                port=args.port,
                broker=args.broker,
                workers_per_model=args.workers_per_model,
                heartbeat=heartbeat,
                request_timeout_s=args.request_timeout,
                plugins=tuple(args.plugin),
                state_dir=args.state_dir,
                models=tuple(args.model),
            )
            run_event_loop(serve(options))
        else:
            return _run_worker(args.target, args.model_version, args.connect, heartbeat)
    except (KetchError, OSError, ValueError) as exc:
        print(f"ketch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _list_plugins(extra: Sequence[str]) -> int:
    from ketch.plugin_manager import load_plugins, share_plugins

    share_plugins(extra)
    plugins = load_plugins()
    rows = [("PLUGIN", "FROM", "POLICIES", "RUNTIMES")]
    rows += [
        (p.name, p.source, ", ".join(p.policies) or "-", ", ".join(p.runtimes) or "-")
        for p in plugins.describe()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, source, policies, runtimes in rows:
        print(f"{name:<{widths[0]}}  {source:<{widths[1]}}  {policies:<{widths[2]}}  {runtimes}")
    return 0


def _run_worker(target: str, version: str | None, broker: str, heartbeat: Heartbeat) -> int:
    from ketch.worker_main import WorkerPlan, run_worker

    plan = WorkerPlan(
        target, version, broker, heartbeat.interval_s, heartbeat.liveness, managed=False
    )
    print(f"ketch: worker for {target} joining {broker}", file=sys.stderr, flush=True)
    run_worker(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
