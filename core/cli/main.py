"""The ``ketch`` command: ``ketch serve`` runs the gateway and its workers, ``ketch worker``
joins a running gateway with one more worker (possibly from another machine), ``ketch
plugins`` lists the plugins and policies the gateway would load, ``ketch status`` prints what a
running server is doing, and ``ketch models ...`` and ``ketch apps ...`` change what it serves
through its management API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ketch.cli.admin import (
    add_apps_commands,
    add_models_commands,
    add_server_options,
    run_admin_action,
)
from ketch.cli.arg_types import (
    non_negative_int,
    port_number,
    port_or_off,
    positive_float,
    positive_int,
)
from ketch.cli.config import ConfigError, ReplaceDefault, load_defaults
from ketch.cli.deploy import add_deploy_commands, run_deploy, run_deployments
from ketch.cli.http_client import ServerError
from ketch.cli.keys import (
    add_keygen_command,
    add_serve_key_options,
    add_worker_key_options,
    run_keygen,
    worker_keys,
)
from ketch.cli.planning_commands import add_planning_commands
from ketch.errors import KetchError
from ketch.grpc.server import DEFAULT_GRPC_PORT
from ketch.http.deployments import DEFAULT_MAX_DEPLOY_BYTES
from ketch.http.limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_SHUTDOWN_GRACE_S,
    MIB,
    HttpLimits,
)
from ketch.http.server import run_event_loop
from ketch.observability.events import LOG_FORMATS, JsonLogFormatter
from ketch.server import DEFAULT_BROKER, ServeOptions, serve
from ketch.zmq_transport.broker import DEFAULT_MAX_MESSAGE_BYTES
from ketch.zmq_transport.liveness import DEFAULT_INTERVAL_S, DEFAULT_LIVENESS, Heartbeat
from ketch.zmq_transport.security import WorkerKeys


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="the least severe Python log records to print on stderr (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between heartbeats, both ways (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-liveness",
        type=positive_int,
        default=DEFAULT_LIVENESS,
        metavar="N",
        help="a peer silent for N heartbeat intervals is dead (default %(default)s)",
    )


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p",
        "--plugin",
        action=ReplaceDefault,
        default=[],
        metavar="MODULE_OR_FILE",
        help="load this module or file as a plugin too (repeatable; default none), in the "
        "gateway and in every worker; installed plugins (the 'ketch' entry-point group) load "
        "unless KETCH_DISABLE_PLUGIN_AUTOLOAD is set",
    )


_SERVE_EPILOG = f"""\
Every option can also come from the environment, as KETCH_<OPTION> (upper case, '-' as
'_': KETCH_PORT, KETCH_REQUEST_TIMEOUT, KETCH_SOURCE for PATH_OR_MODULE; KETCH_MODEL and
KETCH_PLUGIN are lists separated by '{os.pathsep}'), and from the [serve] table of a TOML
file (keys as the options with '_': port = 8080, state_dir = "state", model = ["..."]).

Precedence, highest first: command line > environment > config file > defaults.
The config file is --config PATH, else $KETCH_CONFIG, else ./ketch.toml when it exists.
See docs/configuration.md.
"""

_WORKER_EPILOG = """\
Every option can also come from the environment, as KETCH_<OPTION> (KETCH_TARGET for the
model, KETCH_CONNECT, KETCH_MODEL_VERSION; the heartbeat's and the log level's variables are
the ones ketch serve reads too), and from the [worker] table of a TOML file (target = "app.py",
connect = "tcp://gateway:7070").

Precedence, highest first: command line > environment > config file > defaults.
The config file is --config PATH, else $KETCH_CONFIG, else ./ketch.toml when it exists.
See docs/configuration.md.
"""


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ketch`` parser, and the subparsers config files configure by command name."""
    parser = argparse.ArgumentParser(prog="ketch", description="Serve models over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser(
        "serve",
        help="serve the models of a file or module over HTTP",
        description="Serve the models and applications of a file or module over HTTP.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cmd.add_argument(
        "source",
        metavar="PATH_OR_MODULE",
        nargs="?",
        help="the file or module with the models and applications, e.g. app.py or pkg.models "
        "(default none: the server serves what --model names and what is deployed to it)",
    )
    _add_config_option(serve_cmd, "serve")
    serve_cmd.add_argument(
        "--model",
        action=ReplaceDefault,
        default=[],
        metavar="NAME=RUNTIME:PATH",
        help="also serve a saved model through a runtime, e.g. resnet=torch:model.pt2 "
        "(repeatable; `ketch plugins` lists the runtimes; default none)",
    )
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="HTTP interface to listen on (default %(default)s)"
    )
    serve_cmd.add_argument(
        "--port",
        type=port_number,
        default=8000,
        help="HTTP port, 0 for any free port (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--model-control",
        choices=["none", "explicit"],
        default="none",
        help="explicit lets clients load and unload models (Triton's model repository "
        "extension, over HTTP and gRPC); none refuses it (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--grpc-port",
        type=port_or_off,
        default=DEFAULT_GRPC_PORT,
        metavar="PORT|off",
        help="port of the Open Inference Protocol over gRPC (Triton's and KServe's clients), "
        "on --host; 0 for any free port, off for none (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--broker",
        default=DEFAULT_BROKER,
        metavar="ENDPOINT",
        help="ZeroMQ endpoint workers connect to; tcp://0.0.0.0:7070 admits remote workers "
        "(default %(default)s)",
    )
    serve_cmd.add_argument(
        "--gateways",
        type=positive_int,
        default=1,
        metavar="N",
        help="run N gateway processes on the same HTTP and gRPC ports (SO_REUSEPORT), sharing "
        "the workers and the applications' state (in --state, else a private Redis: needs "
        "ketch[redis] or a redis-server), so HTTP parsing uses N cores (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--reuse-port",
        action="store_true",
        help="listen on the HTTP and gRPC ports with SO_REUSEPORT, so that other gateways "
        "given the same --state share them (--gateways N sets it for its own; default off)",
    )
    serve_cmd.add_argument(
        "--placement",
        choices=("local", "ray"),
        default="local",
        help="where the pools start workers: processes of this machine, or on the nodes of a "
        "Ray cluster, which picks one with each model's resources (needs ketch[ray] and a "
        "--broker on tcp the nodes reach; default %(default)s)",
    )
    serve_cmd.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="the Ray cluster to place workers on, as ray.init takes it (HOST:PORT, "
        "ray://HOST:10001); with --placement ray (default: auto, the cluster this machine "
        "belongs to)",
    )
    serve_cmd.add_argument(
        "--allow-worker-models",
        action="store_true",
        default=False,
        help="let a worker started by hand add a model version this server does not serve, "
        "for as long as such workers stay (default: off, such a worker is refused)",
    )
    serve_cmd.add_argument(
        "--broker-max-message-mb",
        type=positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES // 2**20,
        metavar="MIB",
        help="the largest frame a worker may send the broker, in MiB; a larger one "
        "disconnects it (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--plan",
        type=Path,
        default=None,
        metavar="PLAN.json",
        help="serve the models a plan names (ketch plan) with its batch sizes, delays, replicas "
        "and threads (default none)",
    )
    serve_cmd.add_argument(
        "--workers-per-model",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="keep at least N workers warm per model version, raising each model's "
        "min_replicas (default %(default)s: pools start at their min_replicas, often zero, "
        "and start workers on demand)",
    )
    serve_cmd.add_argument(
        "--request-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="answer 504 when a request has no result after this long (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--max-body-mb",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES // MIB,
        metavar="MIB",
        help="the largest request body, in MiB; a larger one is answered 413 without being "
        "read (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--read-timeout",
        type=positive_float,
        default=DEFAULT_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="the longest a request's headers (also the keep-alive timeout of an idle "
        "connection) and then its body may take to arrive; a late body is answered 408 "
        "(default %(default)s)",
    )
    serve_cmd.add_argument(
        "--shutdown-grace",
        type=positive_float,
        default=DEFAULT_SHUTDOWN_GRACE_S,
        metavar="SECONDS",
        help="on SIGINT or SIGTERM, how long the requests in flight have to finish; later, "
        "and for new requests, the answer is 503 with Retry-After; a second signal stops at "
        "once (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where applications keep their policies' state across restarts (default "
        "$KETCH_STATE_DIR, else ~/.local/state/ketch)",
    )
    serve_cmd.add_argument(
        "--state",
        default=None,
        metavar="URL",
        help="keep applications' policy state, the queries they answered and their feedback "
        "in the Redis at URL (redis://HOST:PORT/DB, rediss:// for TLS), shared by every "
        "gateway given the same URL (default: this gateway's own, in --state-dir)",
    )
    serve_cmd.add_argument(
        "--store",
        type=Path,
        default=None,
        metavar="DIR",
        help="the model store: deployed code, the environments built for it, and what a "
        "restart serves again (default STATE_DIR/store)",
    )
    serve_cmd.add_argument(
        "--max-deploy-mb",
        type=positive_int,
        default=DEFAULT_MAX_DEPLOY_BYTES // MIB,
        metavar="MB",
        help="the largest archive ketch deploy may send, and the most it may unpack to "
        "(default %(default)s)",
    )
    serve_cmd.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="how to print status on stdout and logs on stderr: text ('ketch: ...' lines) "
        "or json (one JSON object per line) (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--admin-token",
        default=None,
        metavar="TOKEN",
        help="turn the management API (/admin) on, for requests with 'Authorization: Bearer "
        "TOKEN' (default none: every /admin route answers 401); prefer KETCH_ADMIN_TOKEN, "
        "which other users cannot read in the process list",
    )
    serve_cmd.add_argument(
        "--predict-token",
        default=None,
        metavar="TOKEN",
        help="require this bearer token (or the admin token) on every route but the health "
        "probes, /metrics and /openapi.json (default none: they are open); prefer "
        "KETCH_PREDICT_TOKEN",
    )
    add_serve_key_options(serve_cmd)
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
    plugins_cmd.add_argument(
        "--params",
        action="store_true",
        help="print the params of the policies that declare them as a Params struct (the "
        "built-in ones), as a Markdown table",
    )

    worker_cmd = commands.add_parser(
        "worker",
        help="serve one model as a worker of a running gateway",
        description="Serve one model as a worker of a running gateway (ketch serve).",
        epilog=_WORKER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker_cmd.add_argument(
        "target",
        metavar="PATH_OR_MODULE[:name]",
        nargs="?",
        help="file or module with the model, and the model's name if it has several "
        "(required, here or as KETCH_TARGET or target in [worker])",
    )
    _add_config_option(worker_cmd, "worker")
    worker_cmd.add_argument(
        "--connect",
        default=DEFAULT_BROKER,
        metavar="ENDPOINT",
        help="the gateway's broker endpoint (default %(default)s)",
    )
    worker_cmd.add_argument("--model-version", default=None, help="which version to serve")
    add_worker_key_options(worker_cmd)
    _add_common_options(worker_cmd)
    add_keygen_command(commands)

    status_cmd = commands.add_parser(
        "status", help="print the models and applications of a running server"
    )
    add_server_options(
        status_cmd,
        os.environ.get("KETCH_ADMIN_TOKEN") or os.environ.get("KETCH_PREDICT_TOKEN"),
        "the bearer token of a server started with a predict token (default "
        "$KETCH_ADMIN_TOKEN, else $KETCH_PREDICT_TOKEN)",
    )
    add_planning_commands(commands)
    add_models_commands(commands)
    add_apps_commands(commands)
    add_deploy_commands(commands)
    return parser, {"serve": serve_cmd, "worker": worker_cmd}


def _add_config_option(parser: argparse.ArgumentParser, section: str) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"read defaults for these options from the [{section}] table of this TOML file "
        "(default $KETCH_CONFIG, else ./ketch.toml if it exists)",
    )


def _config_option(argv: Sequence[str]) -> Path | None:
    """The ``--config`` of a ``ketch serve`` or ``ketch worker`` command line, read before the
    full parse since the file it names provides that parse's defaults."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", type=Path, default=None)
    known, _ = early.parse_known_args(argv)
    config: Path | None = known.config
    return config


def _setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s ketch %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser, configured = _build_parsers()
    # `--help` skips the file and environment, so it shows the built-in defaults and works
    # even when ketch.toml is broken.
    command = configured.get(arguments[0]) if arguments else None
    if command is not None and not {"-h", "--help"} & set(arguments):
        try:
            defaults = load_defaults(command, _config_option(arguments[1:]), section=arguments[0])
        except ConfigError as exc:
            print(f"ketch: error: {exc}", file=sys.stderr)
            return 2
        command.set_defaults(**defaults)
    args = parser.parse_args(arguments)
    if args.command == "worker" and args.target is None:
        parser.error(
            "ketch worker needs the model: PATH_OR_MODULE[:name], KETCH_TARGET or target in "
            "the [worker] table of ketch.toml"
        )
    _setup_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    try:
        if args.command == "keygen":
            return run_keygen(args.directory)
        if args.command == "status":
            from ketch.cli.status import print_status

            return print_status(args.url, args.token)
        if args.command == "deploy":
            return run_deploy(args)
        if args.command == "profile":
            from ketch.cli.profile import run_profile

            return run_profile(args)
        if args.command == "plan":
            from ketch.cli.plan import run_plan

            return run_plan(args)
        if args.command == "deployments":
            return run_deployments(args)
        if args.command in ("models", "apps"):
            outcome = run_admin_action(args)
            print(json.dumps(outcome.answer, indent=2) if args.json else outcome.text)
            return 0
        if args.command == "plugins":
            if args.reference:
                from ketch.hookspecs import reference

                print(reference(), end="")
                return 0
            if args.params:
                return _print_policy_params(args.plugin)
            return _list_plugins(args.plugin)
        heartbeat = Heartbeat(args.heartbeat_interval, args.heartbeat_liveness)
        if args.command == "serve":
            options = ServeOptions(
                source=args.source,
                host=args.host,
                port=args.port,
                grpc_port=args.grpc_port,
                model_control=args.model_control,
                broker=args.broker,
                workers_per_model=args.workers_per_model,
                plan=args.plan,
                heartbeat=heartbeat,
                request_timeout_s=args.request_timeout,
                plugins=tuple(args.plugin),
                state_dir=args.state_dir,
                state=args.state,
                store_dir=args.store,
                max_deploy_bytes=args.max_deploy_mb * MIB,
                models=tuple(args.model),
                log_format=args.log_format,
                admin_token=args.admin_token,
                predict_token=args.predict_token,
                broker_keys=args.broker_keys,
                insecure_broker=args.insecure_broker,
                allow_worker_models=args.allow_worker_models,
                placement=args.placement,
                ray_address=args.ray_address,
                reuse_port=args.reuse_port,
                broker_max_message_bytes=args.broker_max_message_mb * 2**20,
                http=HttpLimits(
                    max_body_bytes=args.max_body_mb * MIB,
                    read_timeout_s=args.read_timeout,
                    shutdown_grace_s=args.shutdown_grace,
                ),
            )
            if args.gateways > 1:
                from ketch.cli.gateways import serve_gateways

                run_event_loop(serve_gateways(options, arguments, args.gateways))
            else:
                run_event_loop(serve(options))
        else:
            keys = worker_keys(args)
            return _run_worker(args.target, args.model_version, args.connect, heartbeat, keys)
    except ServerError as exc:
        # The server refused: the request was understood and answered, unlike those below.
        print(f"ketch: error: {exc}", file=sys.stderr)
        return 1
    except (KetchError, OSError, ValueError) as exc:
        print(f"ketch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _list_plugins(extra: Sequence[str]) -> int:
    from ketch.plugin_manager import load_plugins

    plugins = load_plugins(extra)
    rows = [("PLUGIN", "FROM", "POLICIES", "RUNTIMES")]
    rows += [
        (p.name, p.source, ", ".join(p.policies) or "-", ", ".join(p.runtimes) or "-")
        for p in plugins.describe()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, source, policies, runtimes in rows:
        print(f"{name:<{widths[0]}}  {source:<{widths[1]}}  {policies:<{widths[2]}}  {runtimes}")
    return 0


def _print_policy_params(extra: Sequence[str]) -> int:
    from ketch.plugin_manager import load_plugins
    from ketch.plugins.params import reference

    print(reference(load_plugins(extra).policies()), end="")
    return 0


def _run_worker(
    target: str, version: str | None, broker: str, heartbeat: Heartbeat, keys: WorkerKeys | None
) -> int:
    from ketch.plugin_manager import autoload_wanted
    from ketch.worker.plan import WorkerPlan
    from ketch.worker.run import run_worker

    plan = WorkerPlan(
        target,
        version,
        broker,
        heartbeat.interval_s,
        heartbeat.liveness,
        managed=False,
        autoload=autoload_wanted(),
        broker_keys=keys.to_dict() if keys is not None else None,
    )
    print(f"ketch: worker for {target} joining {broker}", file=sys.stderr, flush=True)
    run_worker(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
