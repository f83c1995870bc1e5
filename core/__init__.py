"""ketch: serve models over HTTP, batched, in worker processes that ZeroMQ connects.

The public API is what ``__all__`` lists; every other module is internal.
"""

from __future__ import annotations

from ketch.models import Model, ModelSpec, model

__version__ = "0.1.0"

__all__ = ["Model", "ModelSpec", "__version__", "model"]
