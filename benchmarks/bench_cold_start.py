"""How long a request to a pool at zero waits for its answer, against a fresh interpreter.

A model declared with ``min_replicas=0`` (the default) has no worker process until a request
comes, and goes back to none ``idle_timeout_s`` after the last one. The first request after
that pays for starting a worker: the *cold start*. This benchmark writes a models file with a
trivial model (``@ketch.model(idle_timeout_s=0.3)`` doubling its inputs) to a temporary
directory, serves it with ``ketch serve``, and measures from the client's side, on one
keep-alive HTTP connection:

- **cold start to first answer**, N times (``--cycles``, default 20): wait for the pool's
  ``lost worker ... scaled down`` line and for that worker's process to exit, check ``GET
  /models`` says ``zero``, then time one ``POST /models/double/predict``;
- the **first cold start** after ``ketch: ready``, reported apart (it is also the first fork);
- the **warm** latency of the same request, ``--warm-requests`` (default 200) back to back;
- a **fresh interpreter** baseline, once the server has stopped: ``python -m ketch.cli.main worker
  models.py:double --connect ...`` against a ROUTER socket this script binds, timed from
  starting the process to its READY message; ``--fresh-runs`` (default 5) times.

Then the **preload** case: what ``@ketch.model(preload=True)`` buys for a model whose module is
slow to import. A second models file (so the trivial model's figures above stay what they
were) imports at module level the libraries in :data:`HEAVY_IMPORTS` (Hypercorn's asyncio
server, Starlette, and some standard library: about 150-220 ms, median about 200 ms, in a
fresh interpreter that has already imported ketch, numpy and pyzmq, as the forkserver has;
measured with ``time.perf_counter`` around the imports and ``python -X importtime`` on a
2-core machine) and declares two models with identical bodies, both with the same short
``idle_timeout_s``:

- ``heavy``: forked from the shared forkserver, so every worker imports the file, and pays
  for those imports, on every cold start;
- ``heavy_preloaded`` (``preload=True``): forked from the model's template, which imported the
  file once when the server started, so a worker starts with the imports done.

A second ``ketch serve`` on that file waits for ``ketch: model heavy_preloaded:1 template
ready ...``, makes one untimed cold start of each model, then runs ``--cycles`` cycles, each a
timed cold start of ``heavy`` and then one of ``heavy_preloaded``, each after the other
model's worker has been scaled down and has exited, and with ``GET /models`` saying the model
is at ``zero``. It prints the median and p90 of each, the ratio of the medians (preloaded /
not preloaded), and the template's resident memory from ``GET /models`` (what preload costs
while the pool is at zero). Once that server has stopped, the same imports are timed in
``--fresh-runs`` fresh interpreters (after importing ketch, numpy and pyzmq), to compare
with the difference of the two medians.

Targets: cold start to first answer, median, at most 50 ms (stretch: 25 ms).

Run from anywhere: ``python benchmarks/bench_cold_start.py --cycles 10 [--json]``; the
preload case's figures are in the JSON's ``preload`` object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cold_start_cycles import measure_preload_server, measure_server
from cold_start_fresh import measure_fresh, measure_imports
from cold_start_models import HEAVY_IMPORTS, HEAVY_MODELS_SOURCE, MODELS_SOURCE
from cold_start_report import Report, print_report
from ketch_server import write_models
from report import at_least


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=at_least(1), default=20, help="timed cold starts")
    parser.add_argument("--warm-requests", type=at_least(1), default=200, help="timed warm")
    parser.add_argument("--fresh-runs", type=at_least(1), default=5, help="fresh interpreters")
    parser.add_argument(
        "--idle-timeout", type=float, default=0.3, help="the model's idle_timeout_s"
    )
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if not args.idle_timeout > 0:
        parser.error(f"--idle-timeout must be > 0 s, got {args.idle_timeout}")

    report = Report(args.cycles, args.idle_timeout)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-cold-") as directory:
        models_file = write_models(
            Path(directory), MODELS_SOURCE.format(idle_timeout_s=args.idle_timeout)
        )
        print("starting ketch ...", file=sys.stderr, flush=True)
        measure_server(args, models_file, report)
        # After the server has stopped, so the two do not compete for the two cores.
        measure_fresh(args, models_file, report)

        # The preload case serves a file of its own: were the heavy imports in the file above,
        # every worker of `double` would pay for them too.
        heavy_directory = Path(directory) / "preload"
        heavy_directory.mkdir()
        heavy_file = write_models(
            heavy_directory,
            HEAVY_MODELS_SOURCE.format(
                imports="\n    ".join(f"import {name}" for name in HEAVY_IMPORTS),
                idle_timeout_s=args.idle_timeout,
            ),
        )
        print("preload case: starting ketch ...", file=sys.stderr, flush=True)
        measure_preload_server(args, heavy_file, report)
        measure_imports(args, report)

    return print_report(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
