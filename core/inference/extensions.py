"""Triton's extensions to the Open Inference Protocol that need no model repository: a model's
configuration (Triton's ``ModelConfig``, derived from the model's declaration) and the
statistics of its versions. Each answer is one Struct in Triton's JSON form, which the REST
routes send as it is and the gRPC service parses into Triton's protobuf messages."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from ketch.inference.tensors import v2_datatype
from ketch.observability.statistics import ModelStats
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue
from ketch.specs.signature import TensorSpec

#: Triton's ``DataType`` names of the V2 datatypes.
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}


class TensorConfig(msgspec.Struct, kw_only=True):
    name: str
    data_type: str
    dims: list[int]


class InstanceGroup(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    count: int
    kind: str
    gpus: list[int] | UnsetType = UNSET


class DynamicBatching(msgspec.Struct, kw_only=True):
    max_queue_delay_microseconds: int


class SequenceBatching(msgspec.Struct, kw_only=True):
    max_sequence_idle_microseconds: int


class ModelConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /v2/models/{name}[/versions/{version}]/config``: Triton's ``ModelConfig``."""

    name: str
    platform: str
    backend: str
    version_policy: dict[str, Any]
    max_batch_size: int
    input: list[TensorConfig]
    output: list[TensorConfig]
    instance_group: list[InstanceGroup]
    parameters: dict[str, dict[str, str]]
    dynamic_batching: DynamicBatching | UnsetType = UNSET
    sequence_batching: SequenceBatching | UnsetType = UNSET


class Statistics(msgspec.Struct, kw_only=True):
    """``GET /v2/models[/{name}[/versions/{version}]]/stats``."""

    model_stats: list[ModelStats]


def model_config(queue: ModelQueue) -> ModelConfig:
    """The model version's configuration as Triton describes a model: its batch size, tensors
    (per item, as Triton's ``dims`` are when ``max_batch_size`` > 0), its workers as the
    instance group (at most ``max_replicas`` of them, on the GPUs it is given, else CPUs) and
    its batching delay as dynamic batching (a sequence model's as sequence batching)."""
    spec = queue.spec
    gpus = spec.resources.gpus
    group = InstanceGroup(
        name=spec.name,
        count=spec.pool.max_replicas,
        kind="KIND_GPU" if gpus else "KIND_CPU",
        gpus=list(gpus) if gpus else UNSET,
    )
    return ModelConfig(
        name=spec.name,
        platform=f"ketch_{spec.runtime}",
        backend="ketch",
        version_policy={"specific": {"versions": [int(spec.version)]}}
        if spec.version.isdigit()
        else {"latest": {"num_versions": 1}},
        max_batch_size=spec.max_batch_size,
        input=[_tensor_config(t) for t in spec.inputs or spec.hinted_inputs],
        output=[_tensor_config(t) for t in spec.outputs or spec.hinted_outputs],
        instance_group=[group],
        parameters=_parameters(queue),
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=int(spec.max_delay_ms * 1000))
        if spec.max_batch_size > 1 and not spec.sequence
        else UNSET,
        sequence_batching=SequenceBatching(
            max_sequence_idle_microseconds=int(spec.sequence_idle_timeout_s * 1e6)
        )
        if spec.sequence
        else UNSET,
    )


def _tensor_config(tensor: TensorSpec) -> TensorConfig:
    datatype = v2_datatype(tensor.datatype) or ""
    return TensorConfig(
        name=tensor.name,
        data_type=_TRITON_TYPES.get(datatype, "TYPE_INVALID"),
        dims=list(tensor.shape),
    )


def _parameters(queue: ModelQueue) -> dict[str, dict[str, str]]:
    """ketch's settings Triton has no field for, as Triton's string parameters."""
    spec = queue.spec
    values = {
        "ketch.min_replicas": spec.pool.min_replicas,
        "ketch.max_queue": spec.max_queue,
        "ketch.slo_ms": spec.slo_ms,
    }
    return {k: {"string_value": str(v)} for k, v in values.items() if v is not None}


def statistics(dispatcher: Dispatcher, name: str | None, version: str | None) -> Statistics:
    """``{"model_stats": [...]}``: every served version's statistics, or one model's versions,
    or one version's; a 404 for a model or version not served."""
    if name is None:
        queues = dispatcher.queues()
    elif version is not None:
        queues = [dispatcher.queue_for(name, version)]
    else:
        dispatcher.queue_for(name, None)  # the 404 of an unknown model
        queues = [q for q in dispatcher.queues() if q.spec.name == name]
    if not queues and name is not None:
        raise PredictionError(404, f"Request for unknown model: {name!r} is not found")
    ordered = sorted(queues, key=lambda q: (q.spec.name, q.spec.version))
    return Statistics(
        model_stats=[q.statistics.snapshot(q.spec.name, q.spec.version) for q in ordered]
    )
