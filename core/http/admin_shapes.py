"""The bodies of the management API (:mod:`ketch.http.admin`), as msgspec Structs: what its
requests send (unknown keys refused) and what its answers hold.

A field left out of a request is ``UNSET``: :func:`given` turns a request into the mapping of
the fields it did send, which is what a change applies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ketch.deploys.deployer import DeploymentStatus
from ketch.serving.status import ModelStatus
from ketch.specs.pipelines import Step

#: A version label; an integer is taken as its decimal text.
VersionLabel = Annotated[
    str | int,
    Meta(
        description="A version label; an integer is taken as its decimal text.",
        extra={"must": "a string (or an integer)"},
    ),
]
PositiveSeconds = Annotated[float, Meta(gt=0, extra={"must": "a number of seconds > 0"})]


def given(body: msgspec.Struct) -> dict[str, Any]:
    """The fields a request sent (those not ``UNSET``), by name."""
    fields = body.__struct_fields__
    return {name: getattr(body, name) for name in fields if getattr(body, name) is not UNSET}


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A management request: a key the route does not take is a 400, not silently ignored."""


class AddModel(_Request):
    """Serve a model from a runtime's artifact."""

    name: str
    runtime: Annotated[str, Meta(description="A runtime's name (ketch plugins lists them).")]
    path: Annotated[
        str | None,
        Meta(description="The artifact; relative to the server's working folder."),
    ] = None
    version: VersionLabel = "1"
    settings: Annotated[
        dict[str, Any],
        Meta(
            description="Serving options (max_batch_size, min_replicas, ...) and the runtime's "
            "own options, as ketch.deploy takes them."
        ),
    ] = {}
    wait: Annotated[
        bool,
        Meta(
            description="Answer once a worker is ready (503 if none is by the pool's "
            "cold_start_timeout_s; the model stays added)."
        ),
    ] = False


class PoolChange(_Request):
    """The pool settings to change; the others keep their values."""

    min_replicas: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    max_replicas: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    idle_timeout_s: PositiveSeconds | UnsetType = UNSET
    target_inflight: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    cold_start_timeout_s: PositiveSeconds | UnsetType = UNSET


class Roll(_Request):
    """Send requests without a version to ``version`` once it has a ready worker."""

    version: VersionLabel
    timeout_s: (
        Annotated[
            PositiveSeconds,
            Meta(
                description="How long to wait for a ready worker of the version (default: its "
                "pool's cold_start_timeout_s)."
            ),
        ]
        | None
    ) = None


class AppChange(_Request):
    """The application fields to change; the others keep their values, but ``params``: a new
    policy without params starts with none."""

    models: (
        Annotated[
            list[str],
            Meta(
                min_length=1,
                description="'name' or 'name:version', in the order the policy sees them.",
            ),
        ]
        | UnsetType
    ) = UNSET
    policy: Annotated[str, Meta(description="A policy's name (default single).")] | UnsetType = (
        UNSET
    )
    params: (
        Annotated[dict[str, Any], Meta(description="Keyword arguments of the policy.")] | UnsetType
    ) = UNSET
    slo_ms: Annotated[float, Meta(gt=0)] | UnsetType | None = UNSET
    default_output: Annotated[Any, Meta(description="Answered when no model answers in time.")] = (
        UNSET
    )
    has_default_output: (
        Annotated[
            bool,
            Meta(description="Whether default_output is set (false drops it)."),
        ]
        | UnsetType
    ) = UNSET


class AddApp(AppChange):
    """A new application: ``name`` and ``models`` are required."""

    name: str | UnsetType = UNSET


class AddPipeline(_Request):
    """A new pipeline over models already served (``docs/pipelines.md``)."""

    name: str
    steps: Annotated[
        list[Any],
        Meta(
            description='Each step: a model\'s name, or {"step": "model"|"parallel"|'
            '"when_unsure", ...} as GET /apps shows them.'
        ),
    ]
    slo_ms: Annotated[float, Meta(gt=0)] | None = None


class Link(_Request):
    """Add a model to an application."""

    model: Annotated[str, Meta(description="'name' or 'name:version'.")]
    position: (
        Annotated[int, Meta(description="Where in the application's list (default: last).")] | None
    ) = None


class AppDescription(msgspec.Struct, kw_only=True, tag_field="kind", tag="application"):
    """An application: its spec, its counts and its policy's state."""

    name: str
    models: list[str]
    policy: str
    params: dict[str, Any]
    slo_ms: float | None
    default_output: Any
    has_default_output: bool
    query_memory: Annotated[
        int | str, Meta(description="How much of its answered queries it keeps for feedback.")
    ]
    plugin: Annotated[str, Meta(description="The plugin that registered the policy.")]
    queries: int
    defaults: int
    errors: int
    feedback: int
    queries_held: Annotated[int, Meta(description="Answered queries kept for feedback now.")]
    query_bytes_held: Annotated[
        int, Meta(description="Their size, as the query_memory bound counts it (bytes).")
    ]
    policy_state: Any


class Percentiles(msgspec.Struct, kw_only=True):
    """Latencies in milliseconds (null before any)."""

    p50: float | None
    p99: float | None


class StepCounts(msgspec.Struct, kw_only=True):
    """What one step of a pipeline did."""

    step: Annotated[int, Meta(description="Its place in the pipeline, from 1.")]
    models: list[str]
    runs: int
    skipped: Annotated[int, Meta(description="Queries it let pass (a when_unsure step).")]
    errors: int
    share: Annotated[
        float | None, Meta(description="How often a query reaches it: runs / queries.")
    ]
    latency_ms: Percentiles


class PipelineDescription(msgspec.Struct, kw_only=True, tag_field="kind", tag="pipeline"):
    """A pipeline: its steps, and the counts and latencies of it and of each step."""

    name: str
    steps: list[Step]
    slo_ms: float | None
    queries: int
    errors: int
    latency_ms: Percentiles
    step_counts: list[StepCounts]


class PipelineAdded(msgspec.Struct, kw_only=True):
    pipeline: PipelineDescription


class ModelsList(msgspec.Struct, kw_only=True):
    models: list[ModelStatus]


class AppsList(msgspec.Struct, kw_only=True):
    apps: list[AppDescription | PipelineDescription]


class ModelAdded(msgspec.Struct, kw_only=True):
    model: ModelStatus
    default_version: Annotated[
        str,
        Meta(
            description="The version requests without one go to (a new version of a model "
            "already served takes none until it is rolled to)."
        ),
    ]


class ModelChanged(msgspec.Struct, kw_only=True):
    model: ModelStatus


class ModelRemoved(msgspec.Struct, kw_only=True):
    removed: Annotated[list[str], Meta(description="The versions removed, as 'name:version'.")]
    default: Annotated[
        str | None, Meta(description="Where requests without a version go now (null: nowhere).")
    ]
    unfinished_requests: Annotated[
        int, Meta(description="Requests still queued after the server's request timeout.")
    ]


class Rolled(msgspec.Struct, kw_only=True):
    model: str
    default: str
    previous: str


class AppAdded(msgspec.Struct, kw_only=True):
    app: AppDescription


class AppChanged(msgspec.Struct, kw_only=True, omit_defaults=True):
    app: AppDescription
    state: Annotated[
        Literal["kept", "reset"], Meta(description="Whether the policy kept what it learnt.")
    ]
    reset_because: (
        Annotated[str, Meta(description="With state reset: why the policy starts afresh.")]
        | UnsetType
    ) = UNSET


class AppRemoved(msgspec.Struct, kw_only=True):
    removed: str


class DeploymentsList(msgspec.Struct, kw_only=True):
    deployments: list[DeploymentStatus]


class DeploymentVersions(msgspec.Struct, kw_only=True):
    name: str
    versions: list[DeploymentStatus]


class DeploymentRemoved(msgspec.Struct, kw_only=True):
    removed: Annotated[list[str], Meta(description="The deployed versions, as 'name:version'.")]
    models: Annotated[list[str], Meta(description="The model versions no longer served.")]
