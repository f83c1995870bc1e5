"""What a worker process does: load its model, then serve it until told to stop.

:func:`run_worker` is the body of every worker, however it was started (forked from the
shared forkserver, forked from its model's template, or another interpreter). It keeps to the
modules a worker needs (no gateway, no multiprocess).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import replace
from typing import Any

from ketch.errors import TargetLoadError
from ketch.runtimes.python import checked_outputs, make_predict, stack
from ketch.specs.loader import Target, find_model
from ketch.specs.models import ModelSpec
from ketch.specs.resources import Resources
from ketch.specs.resources import apply as apply_resources
from ketch.types import Outputs, Predict
from ketch.worker.plan import WorkerPlan
from ketch.zmq_transport import worker

#: Exit code of a worker whose model cannot be loaded (its last line of output says why), the
#: CLI's code for errors in what it was given.
EXIT_LOAD_FAILED = 2


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
    spec = replace(
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
    worker.serve(spec, predict, plan.options())


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
