"""Sequences of a stateful model (Triton's sequence batcher): the requests of one
``sequence_id`` go to one worker, one at a time and in the order they came.

A model declared ``@ketch.model(sequence=True)`` keeps state per sequence in its worker (a
conversation, a stream's running features). Each request names its sequence with the
``sequence_id`` parameter (a non-zero integer or a non-empty string) and marks the first and the
last with ``sequence_start`` and ``sequence_end``, as Triton's clients do. Here:

- a sequence starts with a request that sets ``sequence_start``; a request for a sequence that
  is not active without it is a 400 that says why (never started, ended, idle, worker lost);
- its requests run one at a time, in arrival order (a FIFO lock per sequence), so a stream
  that sends steps without waiting still reaches the model in order;
- its first request binds it to the worker that computes it (the one with room and the fewest
  sequences); later ones wait for that worker, batched with other sequences' steps there;
- it ends with its ``sequence_end`` request, or after ``sequence_idle_timeout_s`` without one;
- a worker lost (or stalled) mid-sequence takes the sequence's state with it: its step in
  flight gets a 503 and the sequence is over, so the client knows to start again.

The model sees every item's ``sequence_id``, ``sequence_start`` and ``sequence_end`` in
``params`` (the flags always there, as booleans).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ketch.serving.jobs import Binding, Deadline, PredictionError
from ketch.serving.refusals import deadline_passed, labels
from ketch.specs.models import ModelSpec
from ketch.types import Outputs

#: Ended sequences remembered, so that a late request learns why its sequence is over.
ENDED_KEPT = 4096

SequenceId = int | str
#: One step's work: the model's outputs for the request, given its params and its binding.
Step = Callable[[dict[str, Any], Binding], Awaitable[Outputs]]


@dataclass(slots=True, eq=False)
class _Sequence:
    binding: Binding
    last_used: float
    #: Steps running or waiting their turn: an idle sequence has none.
    waiting: int = 0
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sequences:
    """The active sequences of one sequence model version (see the module's docstring).

    :param spec: the model version's spec as it is now (its idle timeout can change).
    :param changed: called when a sequence ends, so that the pool may scale down a worker
        that no longer holds one.
    """

    def __init__(self, spec: Callable[[], ModelSpec], changed: Callable[[], None]) -> None:
        self._spec_now = spec
        self._changed = changed
        self._active: dict[SequenceId, _Sequence] = {}
        self._ended: OrderedDict[SequenceId, str] = OrderedDict()
        self._per_worker: Counter[bytes] = Counter()
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def _spec(self) -> ModelSpec:
        return self._spec_now()

    @property
    def active(self) -> int:
        return len(self._active)

    def held_by(self, worker: bytes) -> int:
        """How many active sequences are bound to ``worker``."""
        return self._per_worker[worker]

    async def step(self, params: Mapping[str, Any], deadline: Deadline, run: Step) -> Outputs:
        """Run one request of a sequence (named in ``params``) in its turn, by ``deadline``."""
        sequence_id, start, end = sequence_flags(self._spec, params)
        sequence = self._active.get(sequence_id)
        if sequence is None:
            if not start:
                raise self._not_active(sequence_id)
            sequence = _Sequence(Binding(sequence_id), time.monotonic())
            self._active[sequence_id] = sequence
            self._ended.pop(sequence_id, None)
        sequence.waiting += 1
        try:
            try:
                async with asyncio.timeout(deadline.at - time.monotonic()):
                    await sequence.turn.acquire()
            except TimeoutError:
                raise deadline_passed(self._spec, deadline.budget_s, computing=False) from None
            try:
                return await self._run(sequence, start, end, params, run)
            finally:
                sequence.turn.release()
        finally:
            sequence.waiting -= 1
            sequence.last_used = time.monotonic()
            if not sequence.waiting and sequence.binding.ended is not None:
                self._forget(sequence)
            self._arm_idle_timer()

    async def _run(
        self, sequence: _Sequence, start: bool, end: bool, params: Mapping[str, Any], run: Step
    ) -> Outputs:
        binding = sequence.binding
        if start and binding.ended is not None:
            # Started again after it ended: a sequence of its own, free to go to any worker.
            sequence.binding = binding = Binding(binding.sequence_id)
        elif binding.ended is not None:
            raise self._not_active(binding.sequence_id, binding.ended)
        given = {
            **params,
            "sequence_id": binding.sequence_id,
            "sequence_start": start,
            "sequence_end": end,
        }
        try:
            return await run(given, binding)
        finally:
            if end:
                self._end(binding, "its last request (sequence_end) came")

    def bind(self, binding: Binding, worker: bytes) -> None:
        """``binding``'s first request goes to ``worker``: every later one will."""
        binding.worker = worker
        self._per_worker[worker] += 1

    def worker_lost(self, worker: bytes, reason: str) -> None:
        """End every sequence bound to ``worker``: their state went with it."""
        for sequence in list(self._active.values()):
            if sequence.binding.worker == worker:
                self._end(sequence.binding, f"its worker was lost ({reason})")
                if not sequence.waiting:
                    self._forget(sequence)

    def _end(self, binding: Binding, why: str) -> None:
        if binding.ended is not None:
            return
        binding.ended = why
        if binding.worker is not None:
            self._per_worker[binding.worker] -= 1
            if self._per_worker[binding.worker] <= 0:
                del self._per_worker[binding.worker]
        self._changed()

    def _forget(self, sequence: _Sequence) -> None:
        sequence_id = sequence.binding.sequence_id
        if self._active.get(sequence_id) is sequence:
            del self._active[sequence_id]
        self._ended[sequence_id] = sequence.binding.ended or "it ended"
        self._ended.move_to_end(sequence_id)
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def _arm_idle_timer(self) -> None:
        """Look for idle sequences when the oldest idle one's time is up."""
        if self._idle_timer is not None:
            return
        idle = [s.last_used for s in self._active.values() if not s.waiting]
        if not idle:
            return
        wait_s = min(idle) + self._spec.sequence_idle_timeout_s - time.monotonic()
        self._idle_timer = asyncio.get_running_loop().call_later(max(wait_s, 0.0), self._end_idle)

    def _end_idle(self) -> None:
        self._idle_timer = None
        timeout_s = self._spec.sequence_idle_timeout_s
        now = time.monotonic()
        for sequence in list(self._active.values()):
            if not sequence.waiting and now - sequence.last_used >= timeout_s:
                self._end(sequence.binding, f"it had no request for {timeout_s:g} s")
                self._forget(sequence)
        self._arm_idle_timer()

    def _not_active(self, sequence_id: SequenceId, why: str | None = None) -> PredictionError:
        why = why or self._ended.get(sequence_id)
        over = f"it is over: {why}; " if why else ""
        return PredictionError(
            400,
            f"sequence {sequence_id!r} of model {self._spec.label()!r} is not active: {over}a "
            "sequence's first request must set sequence_start",
            **labels(self._spec),
            sequence_id=sequence_id,
        )


def sequence_flags(spec: ModelSpec, params: Mapping[str, Any]) -> tuple[SequenceId, bool, bool]:
    """A request's ``sequence_id``, ``sequence_start`` and ``sequence_end``, checked."""
    sequence_id = params.get("sequence_id")
    if isinstance(sequence_id, bool) or sequence_id in (None, 0, ""):
        raise PredictionError(
            400,
            f"model {spec.label()!r} is a sequence model: each request needs a 'sequence_id' "
            f"parameter (a non-zero integer or a non-empty string), got {sequence_id!r}",
            **labels(spec),
        )
    if not isinstance(sequence_id, int | str):
        raise PredictionError(
            400,
            f"'sequence_id' must be a non-zero integer or a non-empty string, got {sequence_id!r}",
            **labels(spec),
        )
    flags = []
    for name in ("sequence_start", "sequence_end"):
        flag = params.get(name, False)
        if not isinstance(flag, bool):
            raise PredictionError(
                400, f"{name!r} must be true or false, got {flag!r}", **labels(spec)
            )
        flags.append(flag)
    return sequence_id, flags[0], flags[1]
