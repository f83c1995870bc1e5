"""The built-in policies' parameters, each policy's declared once as a ``msgspec.Struct``.

Each built-in policy class names its Struct ``Params`` (a subclass of :class:`PolicyParams`)
and validates an application's ``params`` through it (:func:`parsed`): unknown parameters,
wrong types and values out of range are refused with the parameter's name and its value.
``docs/plugins.md``'s table of parameters is :func:`reference`, generated from the same
Structs (``ketch plugins --params``), so the docs cannot list a parameter a policy refuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import msgspec.inspect as mi

from ketch.plugins._common import Method

if TYPE_CHECKING:
    from ketch.policy import Policy


class PolicyParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the built-in policies' parameter Structs: keyword-only, frozen, and refusing
    what they do not declare (a subclass inherits that; it repeats ``frozen=True`` for type
    checkers). A field's ``msgspec.Meta(description=...)`` is its line in the docs."""

    def __post_init__(self) -> None:
        # msgspec takes inf for a float bounded on one side only: no parameter means that.
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: expected a finite number")


P = TypeVar("P", bound=PolicyParams)

#: ``seed`` as the policies that draw at random take it.
Seed = Annotated[
    int | None,
    msgspec.Meta(
        description="seed of the policy's random draws, for reproducible runs; None seeds "
        "from the operating system"
    ),
]
MethodParam = Annotated[
    Method,
    msgspec.Meta(
        description="how answers combine: the weighted mean of numbers (or of lists of "
        "numbers, element by element), the weighted majority vote, or auto: the mean when "
        "every answer is numeric that way, else the vote"
    ),
]
#: ``{model: weight}``; which models it may name, and its total, the policy checks.
Weights = dict[str, Annotated[float, msgspec.Meta(ge=0)]] | None

_AT = re.compile(r" - at `\$\.(?P<name>\w+)(?P<rest>[^`]*)`$")


def parsed(shape: type[P], params: Mapping[str, Any]) -> P:
    """``params`` as a ``shape``, or a ``TypeError`` (unknown parameter, wrong type) or
    ``ValueError`` (a value out of range) naming the parameter and its value."""
    try:
        return msgspec.convert(dict(params), shape)
    except msgspec.ValidationError as exc:
        raise _refusal(shape, params, str(exc)) from None


def _refusal(shape: type[PolicyParams], params: Mapping[str, Any], message: str) -> Exception:
    unknown = re.fullmatch(r"Object contains unknown field `(?P<name>[^`]+)`", message)
    if unknown is not None:
        name = unknown["name"]
        takes = ", ".join(shape.__struct_fields__) or "none"
        return TypeError(f"unknown parameter {name}={params[name]!r} (this policy takes: {takes})")
    at = _AT.search(message)
    if at is None:  # a __post_init__ check, whose message names the parameter already
        return ValueError(message)
    name, within = at["name"], at["rest"]
    reason = message[: at.start()]
    where = f" at {name}{within}" if within else ""
    text = f"{name}={params[name]!r}: {reason[0].lower()}{reason[1:]}{where}"
    return TypeError(text) if ", got `" in reason else ValueError(text)


# -- the docs' table ------------------------------------------------------------------------


def reference(policies: Mapping[str, type[Policy]]) -> str:
    """The parameters of ``policies`` (by registered name) that declare a ``Params`` Struct,
    as a Markdown table: one row per parameter, with what it takes and its default."""
    rows = ["| policy | param | takes | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, policy in policies.items():
        shape = getattr(policy, "Params", None)
        if not (isinstance(shape, type) and issubclass(shape, PolicyParams)):
            continue
        info = mi.type_info(shape)
        assert isinstance(info, mi.StructType)
        fields = info.fields
        if not fields:
            rows.append(f"| `{name}` | none | | | |")
        for field in fields:
            kind, description = _described(field.type)
            rows.append(
                f"| `{name}` | `{field.name}` | {_takes(kind)} | `{field.default!r}` | "
                f"{description} |"
            )
    return "\n".join(rows) + "\n"


def _described(kind: mi.Type) -> tuple[mi.Type, str]:
    if isinstance(kind, mi.Metadata):
        description = (kind.extra_json_schema or {}).get("description", "")
        return kind.type, str(description)
    return kind, ""


def _takes(kind: mi.Type) -> str:
    """What a parameter takes, for people: ``a number in (0, 1]``, ``None``, ..."""
    kind, _ = _described(kind)
    if isinstance(kind, mi.UnionType):
        return " or ".join(_takes(member) for member in kind.types)
    if isinstance(kind, mi.NoneType):
        return "`None`"
    if isinstance(kind, mi.IntType):
        return "an integer"
    if isinstance(kind, mi.FloatType):
        return "a number" + _bounds(kind)
    if isinstance(kind, mi.StrType):
        return "a model's name"
    if isinstance(kind, mi.LiteralType):
        return "one of " + ", ".join(f"`{value!r}`" for value in kind.values)
    if isinstance(kind, mi.DictType):
        return f"`{{model: weight}}`, each weight {_takes(kind.value_type)}"
    raise TypeError(f"no description for parameter type {kind!r}")


def _bounds(kind: mi.FloatType) -> str:
    low = (kind.gt, "(") if kind.gt is not None else (kind.ge, "[")
    high = (kind.lt, ")") if kind.lt is not None else (kind.le, "]")
    if low[0] is not None and high[0] is not None:
        return f" in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low[0] is not None:
        return f" {'>' if low[1] == '(' else '>='} {low[0]:g}"
    if high[0] is not None:
        return f" {'<' if high[1] == ')' else '<='} {high[0]:g}"
    return ""
