"""What the Open Inference Protocol says of the server and of a model, whichever protocol asks:
the metadata as msgspec Structs (the REST answers' shapes, and what the gRPC answers are built
from)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

import ketch
from ketch.inference.tensors import v2_datatype
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.queue import ModelQueue
from ketch.serving.status import ready_to_serve
from ketch.specs.signature import TensorSpec

#: The extensions of Triton's protocol that ketch serves, as its server metadata lists them.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
    "system_shared_memory",
    "sequence_batching",
]


class TensorMeta(msgspec.Struct, kw_only=True):
    name: str
    datatype: str
    shape: Annotated[list[int], Meta(description="-1 where a size may vary (the batch first).")]


class ModelMetadata(msgspec.Struct, kw_only=True):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ModelReadiness(msgspec.Struct, kw_only=True):
    name: str
    version: str
    ready: bool

    @classmethod
    def of(cls, queue: ModelQueue) -> ModelReadiness:
        # Pools scale from zero: a model without workers is ready when a request would start one.
        return cls(name=queue.spec.name, version=queue.spec.version, ready=ready_to_serve(queue))


class ServerMetadata(msgspec.Struct, kw_only=True):
    name: str
    version: str
    extensions: list[str]


def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="ketch", version=ketch.__version__, extensions=list(EXTENSIONS))


def model_metadata(dispatcher: Dispatcher, queue: ModelQueue) -> ModelMetadata:
    spec = queue.spec
    return ModelMetadata(
        name=spec.name,
        versions=dispatcher.versions(spec.name),
        platform=f"ketch_{spec.runtime}",
        inputs=[tensor_metadata(t, spec.has_batch_axis) for t in spec.inputs or spec.hinted_inputs],
        outputs=[
            tensor_metadata(t, spec.has_batch_axis) for t in spec.outputs or spec.hinted_outputs
        ],
    )


def tensor_metadata(tensor: TensorSpec, batched: bool) -> TensorMeta:
    # ketch's shapes are per item; V2's include the batch axis, of any size, where there is one.
    datatype = v2_datatype(tensor.datatype) or tensor.datatype.upper()
    shape = [-1, *tensor.shape] if batched else list(tensor.shape)
    return TensorMeta(name=tensor.name, datatype=datatype, shape=shape)
