"""The entry points of worker and template processes, however they were started.

``ketch serve`` starts them three ways: forked from the shared forkserver
(:func:`forked_main`), forked from the model's own template (:mod:`ketch.worker.template`,
which calls :func:`ketch.worker.run.run_worker`'s parts itself), or as a fresh interpreter
running this module (``python -m ketch.worker.main worker PLAN_JSON``, :func:`main`) for
models declared with ``python=``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ketch.worker.plan import WorkerPlan
from ketch.worker.run import redirect_output, run_worker
from ketch.worker.template import run_template


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
    run_template(plan, control.detach())


def main(argv: list[str]) -> None:
    """``python -m ketch.worker.main worker`` or ``... template FD``, the plan as JSON on
    stdin: the entry point of workers and templates started in another interpreter
    (``python=``)."""
    if not argv or argv[0] not in ("worker", "template"):
        raise SystemExit("usage: python -m ketch.worker.main worker|template [FD] < PLAN_JSON")
    plan = WorkerPlan.from_json(sys.stdin.read())
    if argv[0] == "worker":
        run_worker(plan)
        return
    run_template(plan, int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
