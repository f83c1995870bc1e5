"""``ketch.app(...)``: declare an application that combines models through a policy.

An application is declared in the served file, next to its models, and lives in the gateway:
``POST /apps/{name}/predict`` asks the models its policy selects and combines their answers,
``POST /apps/{name}/feedback`` teaches the policy. The declaration is plain data, checked when
it is made and assigned to a name at the served file's top level, where the loader finds it;
the gateway checks the policy and the models exist when it starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import orjson

from ketch.specs.models import NAME_PATTERN, cache_limit, plain_data

#: An application keeps its answered queries for feedback up to two bounds, whichever comes
#: first: this many queries, and ``DEFAULT_QUERY_MEMORY`` of them; ``query_memory`` sets one.
MAX_QUERIES_KEPT = 100_000
DEFAULT_QUERY_MEMORY = "64MiB"
_DEFAULT_QUERY_BYTES = 64 * 2**20  # DEFAULT_QUERY_MEMORY


class AppSpec(msgspec.Struct, frozen=True, kw_only=True):
    """An application as declared.

    :param name: URL name (``/apps/{name}/predict``).
    :param models: the models it may ask, ``"name"`` or ``"name:version"``, in the order the
        policy sees them (a cascade's cheapest first, a shadow's primary first).
    :param policy: the name a policy plugin registered (``ketch plugins`` lists them).
    :param params: keyword arguments for the policy (``{"gamma": 0.05}``), JSON values.
    :param slo_ms: the application answers by this deadline with whatever models answered;
        ``None`` waits for the models up to the server's request timeout.
    :param default_output: answered (with ``"default": true``) when no model answered in
        time; without one, such a query gets an error.
    :param has_default_output: whether ``default_output`` was given (it may be ``None``).
    :param query_memory: how much of its answered queries it keeps for feedback: a size in
        bytes as text (``"64MB"``, ``"1GiB"``) or a number of queries. Both a count bound
        (100,000 queries) and a byte bound (64 MiB) always apply; this sets one of them. The
        oldest queries are forgotten first, and feedback for them is a 404.
    """

    name: str
    models: tuple[str, ...]
    policy: str = "single"
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    slo_ms: float | None = None
    default_output: Any = None
    has_default_output: bool = False
    query_memory: int | str = DEFAULT_QUERY_MEMORY

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON data (what the state file and the management API hold)."""
        return plain_data(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AppSpec:
        """Rebuild a spec from its plain form, with the same checks as ``ketch.app``."""
        return validated_app(
            data["name"],
            data["models"],
            data.get("policy", "single"),
            data.get("params") or {},
            data.get("slo_ms"),
            data.get("default_output"),
            bool(data.get("has_default_output")),
            data.get("query_memory", DEFAULT_QUERY_MEMORY),
        )

    def query_bounds(self) -> tuple[int, int]:
        """``(most queries, most bytes)`` this application keeps for feedback."""
        return query_memory_bounds(self.query_memory, self.name)


class _Missing:
    def __repr__(self) -> str:
        return "<no default output>"


_NO_DEFAULT: Any = _Missing()


def app(
    name: str,
    *,
    models: Sequence[str],
    policy: str = "single",
    params: Mapping[str, Any] | None = None,
    slo_ms: float | None = None,
    default_output: Any = _NO_DEFAULT,
    query_memory: int | str = DEFAULT_QUERY_MEMORY,
) -> AppSpec:
    """Declare an application in the served file: ``reviews = ketch.app("reviews",
    models=[...], policy="exp3", slo_ms=50, default_output=0.5)``.

    See :class:`AppSpec` for the parameters. Returns the spec; assign it at the module's top
    level, where ``ketch serve`` finds it. Two applications of one name in a module are an
    error.
    """
    has_default = default_output is not _NO_DEFAULT
    return validated_app(
        name,
        models,
        policy,
        params or {},
        slo_ms,
        default_output if has_default else None,
        has_default,
        query_memory,
    )


def validated_app(
    name: str,
    models: Sequence[str],
    policy: str,
    params: Mapping[str, Any],
    slo_ms: float | None,
    default_output: Any,
    has_default_output: bool,
    query_memory: int | str = DEFAULT_QUERY_MEMORY,
) -> AppSpec:
    """An :class:`AppSpec`, or ``ValueError``/``TypeError`` naming the value that is wrong."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"application name {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-'"
        )
    if isinstance(models, str) or not isinstance(models, Sequence) or not models:
        raise TypeError(f"models of application {name!r} must be a non-empty list of names")
    for reference in models:
        if not _is_model_reference(reference):
            raise ValueError(
                f"application {name!r} lists {reference!r}: name a model as 'name' or "
                "'name:version'"
            )
    if len(set(models)) != len(models):
        raise ValueError(f"application {name!r} lists a model twice: {list(models)}")
    if not isinstance(policy, str) or not policy:
        raise TypeError(f"policy of application {name!r} must be a policy's name, got {policy!r}")
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"params of application {name!r} must be a dict with string keys")
    _require_json(name, "params", params)
    if slo_ms is not None and (
        isinstance(slo_ms, bool)
        or not isinstance(slo_ms, int | float)
        or not math.isfinite(slo_ms)
        or slo_ms <= 0
    ):
        raise ValueError(f"slo_ms of application {name!r} must be a number > 0, got {slo_ms!r}")
    if has_default_output:
        _require_json(name, "default_output", default_output)
    query_memory_bounds(query_memory, name)
    return AppSpec(
        name=name,
        models=tuple(models),
        policy=policy,
        params=dict(params),
        slo_ms=float(slo_ms) if slo_ms is not None else None,
        default_output=default_output,
        has_default_output=has_default_output,
        query_memory=query_memory,
    )


def query_memory_bounds(query_memory: int | str, app_name: str) -> tuple[int, int]:
    """``(most queries, most bytes)`` kept for feedback under ``query_memory``: a number sets
    the count bound, a size the byte bound, and the other keeps its default. Raises
    ``ValueError`` naming the application and the value when it is neither."""
    try:
        # The same forms as a model's cache_size: one parser, one set of units.
        limit = cache_limit(query_memory, app_name)
    except ValueError:
        limit = None
    if limit is None:
        raise ValueError(
            f"query_memory of application {app_name!r} must be a number of queries >= 1 or a "
            f"size like '64MB', got {query_memory!r}"
        )
    kind, amount = limit
    if kind == "entries":
        return amount, _DEFAULT_QUERY_BYTES
    return MAX_QUERIES_KEPT, amount


def _is_model_reference(reference: Any) -> bool:
    if not isinstance(reference, str):
        return False
    model_name, colon, version = reference.partition(":")
    return bool(NAME_PATTERN.match(model_name)) and (not colon or bool(NAME_PATTERN.match(version)))


def _require_json(app_name: str, what: str, value: Any) -> None:
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise TypeError(f"{what} of application {app_name!r} must be JSON data: {exc}") from None
