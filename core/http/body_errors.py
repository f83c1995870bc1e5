"""A request body that does not fit its shape, said the way a person fixes it: the field, what
it must be, and the value it had.

msgspec reports ``Expected `float` > 0.0 - at `$.timeout_ms```; the gateway answers
``'timeout_ms' must be a number of milliseconds > 0, got -5``. What a field must be comes from
the field's own declaration (``Meta(extra={"must": ...})``) when it says, else from msgspec's
expectation put in words.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_EXPECTED = re.compile(r"^Expected `(?P<types>[^`]+)`(?P<bound>.*?)(?:, got `(?P<got>\w+)`)?$")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")
_TOP_FIELD = re.compile(r"\.(\w+)")
_FIELD = re.compile(r"^Object (?P<how>missing required|contains unknown) field `(?P<name>\w+)`$")
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "null": "null",
    "array": "a list",
    "object": "an object",
}


def explain(error: msgspec.ValidationError, raw: bytes, shape: type[Any]) -> str:
    """The message of a 400 for a body ``raw`` that decoded as JSON but not into ``shape``."""
    match = _AT.match(str(error))
    what, path = (match["what"], match["path"] or "") if match else (str(error), "")
    if field := _FIELD.match(what):
        known = sorted(shape.__struct_fields__)
        if field["how"] == "missing required":
            return f"the request body needs '{field['name']}'"
        return f"unknown key '{field['name']}': this route takes {known}"
    if not path:
        expected = _EXPECTED.match(what)
        got = expected["got"] if expected and expected["got"] else "value"
        return f"request body must be a JSON object, got a JSON {got}"
    where = path.lstrip(".")
    if what == "Number out of range":
        return f"'{where}' is a number out of range: more than a 64-bit number holds"
    # What a field of the body itself (``.timeout_ms``, not deeper) must be may be declared.
    top = _TOP_FIELD.fullmatch(path)
    must = _declared_must(shape, top[1]) if top else None
    got = _value_at(raw, path)
    said = "" if got is _UNREADABLE else f", got {got!r}"
    return f"'{where}' must be {must or _in_words(what)}{said}"


def _in_words(what: str) -> str:
    expected = _EXPECTED.match(what)
    if expected is None:
        return what[0].lower() + what[1:]
    words = [_TYPE_WORDS.get(t.strip(), t.strip()) for t in expected["types"].split("|")]
    kinds = ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1]
    return f"{kinds}{expected['bound']}"


def _declared_must(shape: type[Any], field: str) -> str | None:
    """What a field's declaration says it must be (``Meta(extra={"must": ...})``)."""
    info = msgspec.inspect.type_info(shape)  # only on the way to a 400: no need to cache it
    for candidate in getattr(info, "fields", ()):
        if candidate.encode_name == field:
            return _must_of(candidate.type)
    return None


def _must_of(info: Any) -> str | None:
    if isinstance(info, msgspec.inspect.Metadata) and info.extra:
        must = info.extra.get("must")
        return str(must) if must is not None else None
    for inner in getattr(info, "types", ()):  # a union: Annotated[...] | None
        if (found := _must_of(inner)) is not None:
            return found
    return None


#: What :func:`_value_at` gives for a value it cannot read back (the message then omits it).
_UNREADABLE = object()


def _value_at(raw: bytes, path: str) -> Any:
    """The value the body had at ``path`` (``.inputs[2].name``), read without a shape (so
    that a value the shape refused reads back), or :data:`_UNREADABLE`."""
    try:
        value: Any = msgspec.json.decode(raw)
        for key, index in _STEP.findall(path):
            value = value[key] if key else value[int(index)]
    except (msgspec.DecodeError, LookupError, TypeError, ValueError):
        return _UNREADABLE
    return value
