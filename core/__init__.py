"""ketch: serve models over HTTP, batched, in worker processes that ZeroMQ connects.

The public API is what ``__all__`` lists; every other module is internal. Plugin authors
implement the hooks of ``ketch.hookspecs`` with ``@ketch.hookimpl``, and annotate a
registration hook's callback with ``ketch.RegisterPolicy`` or ``ketch.RegisterRuntime``.
"""

from __future__ import annotations

from ketch.hookspecs import RegisterPolicy, RegisterRuntime, hookimpl
from ketch.policy import Combined, Feedback, Policy, Query
from ketch.runtime import Runtime
from ketch.specs.apps import AppSpec, app
from ketch.specs.deployments import Deployment, deploy
from ketch.specs.models import Model, ModelSpec, model
from ketch.specs.pipelines import PipelineSpec, parallel, pipeline, when_unsure
from ketch.specs.signature import TensorSpec

__version__ = "0.1.0"

__all__ = [
    "AppSpec",
    "Combined",
    "Deployment",
    "Feedback",
    "Model",
    "ModelSpec",
    "PipelineSpec",
    "Policy",
    "Query",
    "RegisterPolicy",
    "RegisterRuntime",
    "Runtime",
    "TensorSpec",
    "__version__",
    "app",
    "deploy",
    "hookimpl",
    "model",
    "parallel",
    "pipeline",
    "when_unsure",
]
