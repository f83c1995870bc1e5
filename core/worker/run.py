"""What a worker process does: load its model through its runtime, then serve it.

:func:`run_worker` is the body of every worker, however it was started (forked from the
shared forkserver, forked from its model's template, or another interpreter). :func:`load`
builds the worker's plugin manager once, from its plan, and takes the runtime the model's
spec names from it: ``python`` for a decorated function, a framework's for a deployment. It
keeps to the modules a worker needs (no gateway, no multiprocess).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import traceback
from typing import Any

from ketch.errors import TargetLoadError
from ketch.plugin_manager import load_plugins
from ketch.specs.models import ModelSpec
from ketch.specs.resources import Resources
from ketch.specs.resources import apply as apply_resources
from ketch.types import Predict
from ketch.worker.plan import WorkerPlan
from ketch.worker.predict import batch_predict
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
        plugins = load_plugins(plan.plugins, autoload=plan.autoload)
        declared = None if plan.deployment is None else ModelSpec.from_dict(plan.deployment)
        runtime_name, artifact, options = _runtime_call(plan, declared)
        if declared is not None:
            apply_resources(declared.resources)  # before the runtime imports its framework
        runtime = plugins.runtime_class(runtime_name)(artifact, options)
        spec = runtime.announced_spec(declared)
        if declared is None and plan.resources is None:
            # A hand-started worker: the function's own, known once it is imported (a pool's
            # plan carries them already, with what a plan or the management API set over them).
            apply_resources(spec.resources)
        return spec, batch_predict(runtime, spec)
    except Exception as exc:
        if not isinstance(exc, TargetLoadError):
            traceback.print_exc()
        print(f"ketch: error: cannot load {_what(plan)}: {_error_text(exc)}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_LOAD_FAILED) from None


def _runtime_call(
    plan: WorkerPlan, declared: ModelSpec | None
) -> tuple[str, str | None, dict[str, Any]]:
    """``(runtime, artifact, options)`` that load the plan's model: the deployment's, or the
    ``python`` runtime's for a decorated function (the target, by version)."""
    if declared is not None:
        return declared.runtime, declared.artifact, dict(declared.options)
    return "python", plan.target, {"version": plan.version}


def run_worker(plan: WorkerPlan) -> None:
    """Worker process body: load the model and serve it until told to stop."""
    if plan.managed:
        # Ctrl-C reaches the whole process group; the gateway alone decides when its
        # workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec, predict = load(plan)
    # The loaded model lives as long as the worker: out of the collector's generations, the
    # collections its batches cause walk only what the batches allocate (no long pauses).
    gc.freeze()
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
