"""The CLI's CURVE options: ``ketch keygen DIR``, and the key options of ``ketch serve`` and
``ketch worker`` (see :mod:`ketch.zmq_transport.security` for the folder's layout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ketch.zmq_transport.security import WorkerKeys, keygen

_INSECURE_HELP = (
    "turn CURVE off on the worker link: any peer that reaches the broker joins as a worker "
    "and sees the requests it is sent; only for a network you trust entirely (default: off)"
)


def add_keygen_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen_cmd = commands.add_parser(
        "keygen",
        help="write the CURVE keys a gateway and its remote workers share",
        description="Write server.key/server.key_secret, worker.key/worker.key_secret and "
        "authorized/worker.key into DIR. Give DIR to `ketch serve --broker-keys` on the "
        "gateway and to `ketch worker --broker-keys` on each remote worker's machine (a "
        "worker needs only server.key and worker.key_secret). More worker keys: put their "
        ".key files into DIR/authorized/.",
    )
    keygen_cmd.add_argument("directory", metavar="DIR", type=Path, help="where to write them")


def run_keygen(directory: Path) -> int:
    for path in keygen(directory):
        print(path)
    return 0


def add_serve_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker-keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="the broker's CURVE keys and the worker keys it admits (DIR/server.key_secret, "
        "DIR/authorized/*.key), as `ketch keygen DIR` writes them (default: keys made at "
        "start, so only the workers this server starts can join)",
    )
    parser.add_argument(
        "--insecure-broker", action="store_true", default=False, help=_INSECURE_HELP
    )


def add_worker_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker-keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="join with DIR/server.key (the broker's public key) and DIR/worker.key_secret "
        "(this worker's pair), as `ketch keygen DIR` writes them (default: none; a worker "
        "needs keys unless the broker is insecure)",
    )
    parser.add_argument(
        "--server-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the broker's public key file (with --key, instead of --broker-keys; default: none)",
    )
    parser.add_argument(
        "--key",
        type=Path,
        default=None,
        metavar="FILE",
        help="this worker's .key_secret file (with --server-key; default: none)",
    )
    parser.add_argument(
        "--insecure-broker", action="store_true", default=False, help=_INSECURE_HELP
    )


def worker_keys(args: argparse.Namespace) -> WorkerKeys | None:
    """The keys ``ketch worker`` joins with, from its options; None with --insecure-broker.

    :raises ValueError: no keys given, contradictory options, or an unreadable key file.
    """
    files = (args.server_key, args.key)
    if args.insecure_broker:
        if args.broker_keys is not None or any(files):
            raise ValueError("--insecure-broker takes no keys")
        print(
            "ketch: WARNING: joining the broker without CURVE (--insecure-broker): the link "
            "is neither encrypted nor authenticated",
            file=sys.stderr,
            flush=True,
        )
        return None
    if args.broker_keys is not None:
        if any(files):
            raise ValueError("give --broker-keys or --server-key with --key, not both")
        return WorkerKeys.from_folder(args.broker_keys)
    if all(files):
        return WorkerKeys.from_files(args.server_key, args.key)
    raise ValueError(
        "the broker needs CURVE keys: --broker-keys DIR (from `ketch keygen DIR`), or "
        "--server-key FILE with --key FILE; --insecure-broker only for a broker started so"
    )
