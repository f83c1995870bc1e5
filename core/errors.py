"""Exceptions that cross module boundaries; each message names the value that was wrong."""

from __future__ import annotations

# What a runtime raises for a batch it cannot take or give back: the worker protocol defines
# them, since it answers each with its own ERROR kind.
from ketch.zmq_transport.protocol import BatchInputError, BatchOutputError

__all__ = ["AppError", "BatchInputError", "BatchOutputError", "KetchError", "TargetLoadError"]


class KetchError(Exception):
    """Base class of ketch's own errors."""


class TargetLoadError(KetchError):
    """A file or module named on the command line could not be imported or holds no model."""


class AppError(KetchError):
    """An application cannot be served: its policy or one of its models is unknown, or its
    policy rejects its parameters."""
