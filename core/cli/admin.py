"""``ketch models ...`` and ``ketch apps ...``: the management API (:mod:`ketch.http.admin`) as
commands, through :class:`~ketch.cli.admin_client.AdminClient`; and ``--url``/``--token``, which
``ketch status`` takes too."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, TypeAlias

from ketch.cli.admin_client import AdminClient, Outcome
from ketch.cli.arg_types import non_negative_int, positive_float, positive_int
from ketch.cli.http_client import DEFAULT_URL
from ketch.errors import KetchError
from ketch.specs.deployments import MODEL_ARGUMENT
from ketch.specs.models import PoolSpec


def add_server_options(
    parser: argparse.ArgumentParser, token_default: str | None, token_help: str
) -> None:
    """``--url`` and ``--token``: which running server, and the bearer token it wants."""
    parser.add_argument(
        "--url",
        default=os.environ.get("KETCH_URL") or DEFAULT_URL,
        help=f"the server's HTTP address (default $KETCH_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=token_default,
        metavar="TOKEN",
        help=f"{token_help}; prefer the variable, which other users cannot read in the "
        "process list",
    )


_ADMIN_DESCRIPTION = """\
{what} of a running server, through its management API (/admin): the server needs an
admin token (ketch serve --admin-token, or KETCH_ADMIN_TOKEN), given here as --token or
KETCH_ADMIN_TOKEN. Changes last until the server restarts: the served file and its --model
options are what a restart serves.
"""

#: What ``add_subparsers`` returns (argparse has no public name for it).
_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _admin_action(actions: _Subcommands, name: str, help: str) -> argparse.ArgumentParser:
    """An action of ``ketch models`` or ``ketch apps``, with the options every one takes."""
    action = actions.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    add_server_options(
        action,
        os.environ.get("KETCH_ADMIN_TOKEN") or None,
        "the server's admin token (default $KETCH_ADMIN_TOKEN)",
    )
    action.add_argument(
        "--json", action="store_true", help="print the server's JSON answer instead of a line"
    )
    return action


def _model_argument(text: str) -> tuple[str, str, str]:
    """``NAME=RUNTIME:PATH`` as ``ketch serve --model`` takes it."""
    match = MODEL_ARGUMENT.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=RUNTIME:PATH (for example resnet=torch:/srv/model.pt2)"
        )
    return match["name"], match["runtime"], match["path"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")  # NaN and Infinity: no JSON server takes them


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value as JSON when it is (``32``, ``true``, ``[0, 1]``), else as the
    string it is (``cpu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value, parse_constant=_reject_constant)
    except ValueError:
        return key, value


def _json_value(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({exc}); quote a string as '\"text\"'"
        ) from None


def add_models_commands(commands: _Subcommands) -> None:
    models = commands.add_parser(
        "models",
        help="list, add, remove, scale, plan and roll the models of a running server",
        description=_ADMIN_DESCRIPTION.format(
            what="List, add, remove, scale, plan and roll the models"
        ),
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    _admin_action(actions, "list", "print the model versions served, with their state")

    add = _admin_action(
        actions,
        "add",
        "serve a model, or another version of one, from a runtime artifact; another version "
        "takes no requests without a version until it is rolled to",
    )
    add.add_argument(
        "model",
        type=_model_argument,
        metavar="NAME=RUNTIME:PATH",
        help="as ketch serve --model takes it; PATH is the server's, relative to its working "
        "folder: echo=python:/srv/echo.py:echo, resnet=torch:/srv/model.pt2",
    )
    add.add_argument("--version", metavar="V", help="the version label (default 1)")
    add.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_setting,
        default=[],
        metavar="KEY=VALUE",
        help="a serving option (max_batch_size=32, min_replicas=1, ...) or an option of the "
        "runtime (device=cpu); VALUE is JSON when it parses as JSON, else a string "
        "(repeatable)",
    )
    add.add_argument(
        "--wait",
        action="store_true",
        help="return once the model has a ready worker; fail if it gets none within its cold "
        "start timeout (the model stays added)",
    )

    remove = _admin_action(
        actions,
        "remove",
        "stop serving a model, or one version of it, once the requests queued on it are answered",
    )
    remove.add_argument("name", metavar="NAME")
    remove.add_argument(
        "--version", metavar="V", help="remove only this version (default every version)"
    )

    scale = _admin_action(
        actions, "scale", "change the replica bounds and timeouts of a model version's pool"
    )
    scale.add_argument("name", metavar="NAME")
    scale.add_argument(
        "--version",
        metavar="V",
        help="the version to scale (default the one requests without a version go to)",
    )
    # Each option's destination is the PoolSpec field it sets.
    scale.add_argument(
        "--min",
        dest="min_replicas",
        type=non_negative_int,
        metavar="N",
        help="workers kept even without traffic; 0 lets the pool scale to zero",
    )
    scale.add_argument(
        "--max",
        dest="max_replicas",
        type=positive_int,
        metavar="N",
        help="the most workers the pool grows to under load",
    )
    scale.add_argument(
        "--idle-timeout",
        dest="idle_timeout_s",
        type=positive_float,
        metavar="S",
        help="seconds with more workers than the load needs before one is stopped",
    )
    scale.add_argument(
        "--target-inflight",
        dest="target_inflight",
        type=positive_int,
        metavar="N",
        help="requests queued or computing per worker; more starts another worker",
    )
    scale.add_argument(
        "--cold-start-timeout",
        dest="cold_start_timeout_s",
        type=positive_float,
        metavar="S",
        help="seconds a request waits for a worker to start before it is answered 503",
    )

    plan = _admin_action(
        actions,
        "plan",
        "serve the models a plan sizes (ketch plan's plan.json) as it plans them: batch size, "
        "delay, replicas, threads and tuner, on every version; workers running with other "
        "threads are replaced, each once a new one is ready",
    )
    plan.add_argument("plan", type=Path, metavar="PLAN.json", help="the plan ketch plan wrote")

    roll = _admin_action(
        actions,
        "roll",
        "send requests without a version to VERSION once it has a ready worker (requests "
        "already queued are answered where they are)",
    )
    roll.add_argument("name", metavar="NAME")
    roll.add_argument("version", metavar="VERSION")
    roll.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help="how long VERSION may take to get a ready worker; on failure nothing changes "
        "(default its pool's cold start timeout)",
    )


def add_apps_commands(commands: _Subcommands) -> None:
    apps = commands.add_parser(
        "apps",
        help="list, add, remove and change the applications of a running server",
        description=_ADMIN_DESCRIPTION.format(what="List, add, remove and change the applications"),
    )
    actions = apps.add_subparsers(dest="action", required=True, metavar="ACTION")
    _admin_action(actions, "list", "print the applications served, with their policy and models")

    add = _admin_action(
        actions, "add", "serve an application that combines served models through a policy"
    )
    add.add_argument("name", metavar="NAME", help="its URL name: /apps/NAME/predict")
    add.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="M",
        help="a model it may ask, NAME or NAME:VERSION, in the order its policy sees them "
        "(repeatable, at least one)",
    )
    _add_app_options(add, changing=False)

    remove = _admin_action(
        actions,
        "remove",
        "stop serving an application; its policy's state is saved, so adding it back with "
        "the same policy resumes it",
    )
    remove.add_argument("name", metavar="NAME")

    link = _admin_action(actions, "link", "add a model to an application's models")
    link.add_argument("name", metavar="NAME")
    link.add_argument("model", metavar="MODEL", help="NAME or NAME:VERSION of a served model")
    link.add_argument(
        "--position",
        type=non_negative_int,
        metavar="N",
        help="its place in the application's models, 0 first (default last)",
    )

    unlink = _admin_action(actions, "unlink", "take a model out of an application's models")
    unlink.add_argument("name", metavar="NAME")
    unlink.add_argument("model", metavar="MODEL", help="as the application lists it")

    change = _admin_action(
        actions,
        "set",
        "change an application's policy, params, deadline or default output; the policy "
        "keeps what it learnt when it is the same and can take it",
    )
    change.add_argument("name", metavar="NAME")
    _add_app_options(change, changing=True)


def _add_app_options(parser: argparse.ArgumentParser, changing: bool) -> None:
    parser.add_argument(
        "--policy",
        metavar="P",
        help="the policy (ketch plugins lists them); its params are the --param options given "
        "with it, none without"
        if changing
        else "the policy combining the models (ketch plugins lists them; default single)",
    )
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        type=_setting,
        metavar="KEY=VALUE",
        help="a keyword argument of the policy, JSON when it parses as JSON, else a string "
        + ("(repeatable; they replace every current param)" if changing else "(repeatable)"),
    )
    parser.add_argument(
        "--slo-ms",
        type=positive_float,
        metavar="X",
        help="answer within X ms with the models that answered by then",
    )
    parser.add_argument(
        "--default-output",
        type=_json_value,
        default=argparse.SUPPRESS,  # absent, unlike JSON null, which is an output
        metavar="JSON",
        help="the output (marked default) of a query no model answered in time",
    )


def _app_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The application fields given as options, as ``/admin/apps`` takes them."""
    fields: dict[str, Any] = {}
    if args.policy is not None:
        fields["policy"] = args.policy
        # Params are the policy's keyword arguments: the old policy's would not fit a new one.
        fields["params"] = {}
    if args.params is not None:
        fields["params"] = dict(args.params)
    if args.slo_ms is not None:
        fields["slo_ms"] = args.slo_ms
    if "default_output" in vars(args):
        fields["default_output"] = args.default_output
    return fields


def run_admin_action(args: argparse.Namespace) -> Outcome:
    client = AdminClient(args.url, args.token)
    match args.command, args.action:
        case "models", "list":
            return client.list_models()
        case "models", "add":
            name, runtime, path = args.model
            return client.add_model(
                name, runtime, path, args.version, dict(args.settings), args.wait
            )
        case "models", "remove":
            return client.remove_model(args.name, args.version)
        case "models", "scale":
            fields = PoolSpec.__struct_fields__
            pool = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
            if not pool:
                raise KetchError(
                    "models scale needs at least one of --min, --max, --idle-timeout, "
                    "--target-inflight, --cold-start-timeout"
                )
            return client.scale(args.name, args.version, pool)
        case "models", "plan":
            return client.apply_plan(args.plan)
        case "models", "roll":
            return client.roll(args.name, args.version, args.timeout)
        case "apps", "list":
            return client.list_apps()
        case "apps", "add":
            return client.add_app(args.name, args.models, _app_fields(args))
        case "apps", "remove":
            return client.remove_app(args.name)
        case "apps", "link":
            return client.link(args.name, args.model, args.position)
        case "apps", "unlink":
            return client.unlink(args.name, args.model)
        case "apps", "set":
            changes = _app_fields(args)
            if not changes:
                raise KetchError(
                    "apps set needs at least one of --policy, --param, --slo-ms, --default-output"
                )
            return client.change_app(args.name, changes)
    raise AssertionError(f"no action for {args.command} {args.action}")
