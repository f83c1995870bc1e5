"""The models files bench_cold_start.py serves, and the lines of ``ketch serve`` it waits for.

The trivial model ``double`` for the cold-start cycles; ``heavy`` and ``heavy_preloaded`` for the
preload case, in a file of their own that imports :data:`HEAVY_IMPORTS` at module level; the
script that times those imports in a fresh interpreter; and the patterns of a worker scaled
down and of ``heavy_preloaded``'s template ready.
"""

from __future__ import annotations

import re

MODEL = "double"
BODY = b'{"input": 21}'
EXPECTED_OUTPUT = 42
MODELS_SOURCE = """
    import ketch


    @ketch.model(idle_timeout_s={idle_timeout_s!r})
    def double(xs):
        return [2 * x for x in xs]
"""
#: The preload case's models: the same body, workers forked from the forkserver (importing the
#: file each time) or from the model's template (which imported it once).
HEAVY = "heavy"
HEAVY_PRELOADED = "heavy_preloaded"
HEAVY_MODELS = (HEAVY, HEAVY_PRELOADED)
#: Imported at module level by the preload case's models file. Only ketch's own dependencies
#: and the standard library, and nothing the forkserver has already imported (asyncio, json):
#: about 200 ms (median; 150-220 ms) in a fresh interpreter that has imported ketch, numpy and
#: pyzmq, of which hypercorn.asyncio ~115 ms, starlette.applications ~50 ms, unittest.mock
#: ~15 ms, the rest ~15 ms together (``python -X importtime``, cumulative, in that order).
HEAVY_IMPORTS = (
    "hypercorn.asyncio",
    "starlette.applications",
    "unittest.mock",
    "email.mime.multipart",
    "http.server",
    "xml.etree.ElementTree",
    "decimal",
)
HEAVY_MODELS_SOURCE = """
    {imports}

    import ketch


    @ketch.model(idle_timeout_s={idle_timeout_s!r})
    def heavy(xs):
        return [2 * x for x in xs]


    @ketch.model(idle_timeout_s={idle_timeout_s!r}, preload=True)
    def heavy_preloaded(xs):
        return [2 * x for x in xs]
"""
#: Run in a fresh interpreter: import what the forkserver holds, then time the heavy imports.
IMPORT_TIMER = """
import importlib, sys, time
import numpy, zmq, ketch.worker.main
started = time.perf_counter()
for name in sys.argv[1:]:
    importlib.import_module(name)
print((time.perf_counter() - started) * 1000)
"""


def scaled_down(model: str) -> re.Pattern[str]:
    """The pool manager letting a worker of ``model`` go (any other loss fails the run)."""
    return re.compile(
        rf"^ketch: model {re.escape(model)}:\S+ lost worker pid (?P<pid>\d+) .*: scaled down"
    )


SCALED_DOWN = scaled_down(MODEL)
#: ``ketch: model heavy_preloaded:1 template ready: pid N, M MB with the model's imports ...``
TEMPLATE_READY = re.compile(
    rf"^ketch: model {HEAVY_PRELOADED}:\S+ template ready: pid (?P<pid>\d+), (?P<rss_mb>\d+) MB"
)
