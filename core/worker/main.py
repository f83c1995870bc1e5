"""What runs inside a worker process, however it was started.

A worker gets a :class:`WorkerPlan` (which model, which broker, which limits), loads the model
and serves it. ``ketch serve`` starts workers three ways, all ending in :func:`run_worker`:
forked from the shared forkserver, forked from the model's own template
(:mod:`ketch.pools.templates`), or as a fresh interpreter running this module
(``python -m ketch.worker.main worker PLAN_JSON``) for models declared with ``python=``.

This module is imported by every worker: it keeps to the modules a worker needs (no gateway,
no multiprocess).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from ketch.errors import TargetLoadError
from ketch.runtimes.python import checked_outputs, make_predict, stack
from ketch.specs.loader import Target, find_model
from ketch.specs.models import ModelSpec
from ketch.specs.resources import Resources
from ketch.specs.resources import apply as apply_resources
from ketch.types import Outputs, Predict
from ketch.zmq_transport import worker
from ketch.zmq_transport.liveness import Heartbeat

#: Exit code of a worker whose model cannot be loaded (its last line of output says why), the
#: CLI's code for errors in what it was given.
EXIT_LOAD_FAILED = 2


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything a worker needs to start; plain data, so it crosses into other interpreters.

    :param target: ``FILE_OR_MODULE:name`` of the model.
    :param version: its version (None: the only or highest one).
    :param broker: the broker endpoint to join.
    :param heartbeat_interval_s, heartbeat_liveness: heartbeat settings, as the broker's.
    :param resources: the model's limits when the starter knows them, applied before the
        model's module is imported so its libraries load with them.
    :param managed: started by ``ketch serve``, which replaces it when it dies (it exits when
        the broker goes away and ignores Ctrl-C); a hand-started worker rejoins instead.
    :param deployment: a deployed model's spec (as a dict): its runtime loads its artifact,
        and ``target`` is not imported.
    """

    target: str
    version: str | None
    broker: str
    heartbeat_interval_s: float = Heartbeat().interval_s
    heartbeat_liveness: int = Heartbeat().liveness
    resources: dict[str, Any] | None = None
    managed: bool = True
    deployment: dict[str, Any] | None = None

    def options(self) -> worker.WorkerOptions:
        heartbeat = Heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        return worker.WorkerOptions(self.broker, heartbeat, rejoin=not self.managed)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        data: Mapping[str, Any] = json.loads(text)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def load(plan: WorkerPlan) -> tuple[ModelSpec, Predict]:
    """Apply the plan's limits, load the model and build its batch predict function; the
    spec returned is the one the worker announces (with the tensors its runtime found).

    On failure, prints the traceback and a last line naming the model and the error (the
    gateway quotes the tail of a worker's output when it reports the exit), and exits with
    :data:`EXIT_LOAD_FAILED`.
    """
    try:
        if plan.resources is not None:
            apply_resources(Resources.from_dict(plan.resources))
        if plan.deployment is not None:
            return _load_deployment(ModelSpec.from_dict(plan.deployment))
        model = find_model(Target.parse(plan.target), plan.version)
        apply_resources(model.spec.resources)
        return model.spec, make_predict(model)
    except Exception as exc:
        if not isinstance(exc, TargetLoadError):
            traceback.print_exc()
        print(f"ketch: error: cannot load {_what(plan)}: {_error_text(exc)}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_LOAD_FAILED) from None


def _load_deployment(spec: ModelSpec) -> tuple[ModelSpec, Predict]:
    from ketch.plugin_manager import installed_plugins

    apply_resources(spec.resources)
    runtime = installed_plugins().runtime_class(spec.runtime)(spec.artifact, spec.options)
    spec = msgspec.structs.replace(
        spec, inputs=runtime.inputs, outputs=runtime.outputs, runtime_info=runtime.describe()
    )
    label = spec.label()

    def predict(inputs: list[Any]) -> Outputs:
        batch = stack(inputs, label) if spec.batch_input == "numpy" else inputs
        return checked_outputs(runtime.predict(batch), len(inputs), label)

    return spec, predict


def run_worker(plan: WorkerPlan) -> None:
    """Worker process body: load the model and serve it until told to stop."""
    if plan.managed:
        # Ctrl-C reaches the whole process group; the gateway alone decides when its
        # workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec, predict = load(plan)
    worker.serve(spec.to_dict(), spec.label(), predict, plan.options())


def redirect_output(fd: int) -> None:
    """Send this process's stdout and stderr to ``fd`` (the gateway's pipe for this worker),
    line-buffered so each line reaches the gateway as it is printed."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def _what(plan: WorkerPlan) -> str:
    deployment = plan.deployment
    if deployment is None:
        return plan.target
    return (
        f"model {deployment['name']}:{deployment['version']} "
        f"(runtime {deployment['runtime']}, {deployment['artifact']})"
    )


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TargetLoadError):
        return str(exc)
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def forked_main(kind: str, plan: WorkerPlan, output: Any, control: Any = None) -> None:
    """Body of a worker or template forked from the shared forkserver.

    :param output: a connection wrapping the write end of the gateway's pipe for this
        process's output.
    :param control: for a template, its end of the control socket.
    """
    fd = os.dup(output.fileno())
    output.close()
    redirect_output(fd)
    if kind == "worker":
        run_worker(plan)
        return
    from ketch.pools.templates import run_template

    run_template(plan, control.detach())


def main(argv: list[str]) -> None:
    """``python -m ketch.worker.main worker PLAN_JSON`` or ``... template PLAN_JSON FD``: the
    entry point of workers and templates started in another interpreter (``python=``)."""
    if len(argv) < 2 or argv[0] not in ("worker", "template"):
        raise SystemExit("usage: python -m ketch.worker.main worker|template PLAN_JSON [FD]")
    plan = WorkerPlan.from_json(argv[1])
    if argv[0] == "worker":
        run_worker(plan)
        return
    from ketch.pools.templates import run_template

    run_template(plan, int(argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
