"""Framework adapters: turn a model artifact into a batch predict callable inside a worker.

Each module in :data:`BUILTIN_RUNTIMES` is a pluggy plugin implementing
``ketch_register_runtimes``, registered like a third party's. A module imports its framework
only inside its runtime's constructor, which runs in the worker; the gateway and the process
that declares a deployment import the module only to check the options.
"""

from __future__ import annotations

#: The dotted names of the built-in runtime modules, in the order they are registered.
BUILTIN_RUNTIMES: tuple[str, ...] = (
    "ketch.runtimes.python",
    "ketch.runtimes.torch",
    "ketch.runtimes.spark.runtime",
    "ketch.runtimes.tensorflow",
    "ketch.runtimes.triton",
)
