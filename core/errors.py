"""Exceptions that cross module boundaries; each message names the value that was wrong."""

from __future__ import annotations


class KetchError(Exception):
    """Base class of ketch's own errors."""


class BatchInputError(KetchError):
    """The inputs cannot be made into the batch the model declared (HTTP 400)."""


class BatchOutputError(KetchError):
    """The model's return value is not one sendable output per input (HTTP 500)."""


class TargetLoadError(KetchError):
    """A file or module named on the command line could not be imported or holds no model."""


class AppError(KetchError):
    """An application cannot be served: its policy or one of its models is unknown, or its
    policy rejects its parameters."""
