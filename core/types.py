"""Type aliases shared across modules."""

from __future__ import annotations

# The worker protocol defines what a batch's outputs and a predict function are.
from ketch.zmq_transport.protocol import Outputs, Predict

__all__ = ["Outputs", "Predict"]
