"""The runtime contract: how a framework adapter loads a saved model and predicts batches.

A runtime is a class registered under a name through the ``ketch_register_runtimes`` hook (the
built-in ones live in ``ketch.runtimes``). It is used in two places:

- in the gateway, for the models deployed (``ketch.deploy``, ``ketch serve --model``, the
  management API): :meth:`Runtime.check` validates the artifact and the options *without
  importing the framework*, so a missing file or a misspelt option fails before any worker
  starts;
- inside each worker process: the constructor imports the framework and loads the artifact,
  :meth:`Runtime.predict` runs one batch, and :attr:`Runtime.inputs` / :attr:`Runtime.outputs`
  describe the tensors, which the worker announces to the gateway
  (:meth:`Runtime.announced_spec`) so that a request of the wrong shape is answered 400
  before it reaches a batch. The worker wraps ``predict`` the same way for every runtime: it
  stacks the inputs for ``batch_input = "numpy"`` and checks one output came back per input.

Decorated ``@ketch.model`` functions are served through the ``python`` runtime, the same way.

The class attribute :attr:`Runtime.batch_input` says how the gateway hands a batch over:
``"numpy"`` stacks the requests' inputs into one array (tensors), ``"list"`` passes the list of
inputs as they came (dict rows, strings).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from msgspec.structs import replace

from ketch.errors import TargetLoadError
from ketch.specs.models import BatchInput, ModelSpec
from ketch.specs.signature import TensorSpec
from ketch.types import Outputs


class Runtime:
    """Base class of framework adapters; subclass it and register it from a plugin.

    :param artifact: where the saved model is: a path for file-based runtimes (absolute by the
        time a worker sees it), ``None`` for runtimes that take everything from options.
    :param options: the runtime's own options (``device="cpu"``), as checked by :meth:`check`.
    """

    #: How the gateway hands a batch to :meth:`predict`; see the module docstring.
    batch_input: ClassVar[BatchInput] = "numpy"
    #: Whether ``artifact`` is a file or folder that must exist (resolved to an absolute path).
    artifact_is_path: ClassVar[bool] = True
    #: The options :meth:`check` accepts, with their defaults.
    default_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, artifact: str | None, options: Mapping[str, Any]) -> None:
        self.artifact = artifact
        self.options = {**self.default_options, **options}
        #: The tensors one item of a batch holds, when the runtime can tell.
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()

    @classmethod
    def check(cls, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``artifact`` and ``options`` where the model is declared, without
        importing the framework; return the options with their defaults filled in.

        Raise ``ValueError`` (or ``FileNotFoundError``) naming the artifact or the option and
        what is wrong with it. The default checks that a path artifact exists and that every
        option is one of :attr:`default_options`.
        """
        if cls.artifact_is_path:
            if artifact is None:
                raise ValueError("this runtime needs the path of a saved model")
            if not Path(artifact).exists():
                raise FileNotFoundError(f"no saved model at {artifact!r}")
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            known = ", ".join(sorted(cls.default_options)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} (this runtime takes: {known})"
            )
        return {**cls.default_options, **options}

    def predict(self, batch: Any) -> Outputs:
        """One output per item of ``batch`` (a stacked array, or a list of inputs)."""
        raise NotImplementedError

    def predict_with_params(self, batch: Any, params: list[dict[str, Any]]) -> Outputs:
        """:meth:`predict` with each item's request parameters (one dict per item), for a
        model whose announced spec says ``takes_params``; the gateway sends parameters to no
        other model (it answers such requests 400)."""
        raise NotImplementedError(f"{type(self).__name__} takes no request parameters")

    def describe(self) -> dict[str, Any]:
        """What ``GET /models`` shows about this runtime once a worker loaded it (e.g. which
        path a pipeline takes)."""
        return {}

    def announced_spec(self, declared: ModelSpec | None) -> ModelSpec:
        """The spec the worker announces to the gateway once this runtime has loaded the
        model: ``declared`` (the deployment's) with the tensors the runtime found and what
        :meth:`describe` says. ``declared`` is None when the worker was given only the
        artifact (``ketch worker app.py:name``): a runtime whose artifacts declare their own
        spec (``python``'s decorated functions) returns that one; the default cannot."""
        if declared is None:
            raise TargetLoadError(
                f"runtime {type(self).__name__} serves deployments only: its artifact "
                f"{self.artifact!r} declares no model spec"
            )
        return replace(
            declared, inputs=self.inputs, outputs=self.outputs, runtime_info=self.describe()
        )
