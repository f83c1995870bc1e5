"""The answered queries an application keeps for feedback, within a count and a byte bound.

Where they are kept is a :class:`Queries`: in the gateway (:class:`LocalQueries`, the
default), or in Redis with ``--state redis://`` (:mod:`ketch.applications.shared`), where a
query answered by one gateway takes its feedback at another.

Every query an application answers is kept with its input and the models' predictions, so
that feedback can reward each model. Inputs come from clients, so what is kept is bounded by
bytes as well as by count (``ketch.app(..., query_memory=...)``): past either bound, the oldest
queries are forgotten first, and feedback for them gets the same 404 as for a query the
application never answered.

A query's size is what its values take as JSON (:func:`encoded_size`) plus a fixed
:data:`QUERY_OVERHEAD_BYTES` for its bookkeeping. JSON is measured rather than Python's own
objects because it costs one fast encoding and no walk over every element; the objects decoded
from it take more (a list of floats about 2.5 times its JSON), so the bound is on the data the
client sent, and the gateway's memory for it is a small multiple of the bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import orjson

from ketch.policy import Query

#: What keeping one query costs besides its values: its record, its id, the Query and the dicts
#: and lists that hold its predictions (about 600 bytes, measured with tracemalloc on CPython
#: 3.11 for a query whose input, prediction and output are numbers).
QUERY_OVERHEAD_BYTES = 600

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

T = TypeVar("T")


def encoded_size(value: Any) -> int:
    """The length of ``value`` as JSON; its ``repr``'s for what JSON cannot hold (an int beyond
    64 bits, a policy's own objects in its notes)."""
    try:
        return len(orjson.dumps(value, option=_JSON_OPTIONS))
    except TypeError:
        return len(repr(value))


@dataclass(slots=True)
class _Kept(Generic[T]):
    item: T
    nbytes: int


class QueryMemory(Generic[T]):
    """Items by query id, oldest first, holding at most ``max_queries`` items and
    ``max_bytes`` bytes of them; an item larger than ``max_bytes`` on its own is not kept."""

    def __init__(self, max_queries: int, max_bytes: int) -> None:
        self._kept: OrderedDict[str, _Kept[T]] = OrderedDict()
        self.held_bytes = 0
        self.max_queries = max_queries
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, query_id: object) -> bool:
        return query_id in self._kept

    def get(self, query_id: str) -> T | None:
        kept = self._kept.get(query_id)
        return None if kept is None else kept.item

    def remember(self, query_id: str, item: T, nbytes: int) -> None:
        """Keep ``item`` as the newest, forgetting the oldest ones past the bounds."""
        if (previous := self._kept.pop(query_id, None)) is not None:
            self.held_bytes -= previous.nbytes
        self._kept[query_id] = _Kept(item, nbytes)
        self.held_bytes += nbytes
        self._forget_oldest()

    def grow(self, query_id: str, nbytes: int) -> None:
        """Count ``nbytes`` more for a kept item (a model's late prediction joined it); nothing
        for one already forgotten."""
        kept = self._kept.get(query_id)
        if kept is None:
            return
        kept.nbytes += nbytes
        self.held_bytes += nbytes
        self._forget_oldest()

    def bound(self, max_queries: int, max_bytes: int) -> None:
        """Apply new bounds (the application's spec changed), forgetting what is now past them."""
        self.max_queries, self.max_bytes = max_queries, max_bytes
        self._forget_oldest()

    def _forget_oldest(self) -> None:
        while self._kept and (
            len(self._kept) > self.max_queries or self.held_bytes > self.max_bytes
        ):
            _, oldest = self._kept.popitem(last=False)
            self.held_bytes -= oldest.nbytes


@dataclass(slots=True)
class AnsweredQuery:
    """A query after its answer: what feedback needs to reward each model."""

    query: Query
    #: Every model's prediction that reached the gateway, in time or late, mirrored or not.
    predictions: dict[str, Any] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    output: Any = None
    default: bool = False
    has_feedback: bool = False
    #: Whether it was handed to the memory: a prediction arriving later adds its size.
    kept: bool = False

    def size(self) -> int:
        """What keeping it costs, as this module counts it."""
        size = QUERY_OVERHEAD_BYTES + encoded_size(self.query.input)
        size += encoded_size(self.query.notes)
        predictions = list(self.predictions.values())
        size += sum(encoded_size(prediction) for prediction in predictions)
        # The output is often one of the predictions, or the shared default_output.
        if not self.default and not any(self.output is p for p in predictions):
            size += encoded_size(self.output)
        return size


class Queries(Protocol):
    """Where an application keeps its answered queries until their feedback."""

    async def remember(self, answered: AnsweredQuery) -> None:
        """Keep ``answered`` as the newest, forgetting the oldest past the bounds."""

    def grew(self, answered: AnsweredQuery, nbytes: int) -> None:
        """A late prediction (a straggler, a mirror) joined a query already kept."""

    async def recall(self, query_id: str) -> AnsweredQuery | None:
        """The query, if it is still kept."""

    async def claim(self, answered: AnsweredQuery) -> bool:
        """Take the query's one feedback: False when it had it already."""

    def bound(self, max_queries: int, max_bytes: int) -> None:
        """Apply new bounds (the application's spec changed)."""

    def held(self) -> tuple[int, int]:
        """How many queries and bytes of them are kept (as last seen, for status)."""


class LocalQueries:
    """The queries an application answered, kept in this gateway's memory."""

    def __init__(self, max_queries: int, max_bytes: int) -> None:
        self._memory: QueryMemory[AnsweredQuery] = QueryMemory(max_queries, max_bytes)

    async def remember(self, answered: AnsweredQuery) -> None:
        answered.kept = True
        self._memory.remember(answered.query.id, answered, answered.size())

    def grew(self, answered: AnsweredQuery, nbytes: int) -> None:
        self._memory.grow(answered.query.id, nbytes)

    async def recall(self, query_id: str) -> AnsweredQuery | None:
        return self._memory.get(query_id)

    async def claim(self, answered: AnsweredQuery) -> bool:
        if answered.has_feedback:
            return False
        answered.has_feedback = True
        return True

    def bound(self, max_queries: int, max_bytes: int) -> None:
        self._memory.bound(max_queries, max_bytes)

    def held(self) -> tuple[int, int]:
        return len(self._memory), self._memory.held_bytes

    @property
    def max_queries(self) -> int:
        return self._memory.max_queries

    @property
    def max_bytes(self) -> int:
        return self._memory.max_bytes
