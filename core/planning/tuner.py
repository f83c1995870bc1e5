"""The tuner: a planned model's replicas scaled live from its arrival envelope (InferLine's
high-frequency tuner).

A plan is proven, in simulation, for the arrivals it was planned with; their **envelope** is
the most arrivals any window of each length held (:data:`WINDOWS_S`: a tenth of a second to
half a minute, so bursts and sustained load both show). Live, the tuner samples how many
requests reached the model's queue, keeps the envelope of the last :data:`HISTORY_S`, and
when it exceeds the planned one in any window, by the largest factor ``k`` over the windows,
asks for ``ceil(planned replicas x k)`` at once. Once the envelope of the history is back
within the plan, it keeps what it asked for :data:`HOLD_S` longer, then falls back to the
planned replicas: up at once, down slowly. The pool manager runs the larger of what the tuner
asks and what its own autoscaler wants (``docs/planning.md``), within ``max_replicas``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

#: The window lengths of an envelope, in seconds.
WINDOWS_S: tuple[float, ...] = (0.1, 1.0, 5.0, 30.0)
#: How much of the past the live envelope covers (its longest window).
HISTORY_S = 30.0
#: How long the tuner keeps extra replicas once the envelope is back within the plan.
HOLD_S = 10.0
#: How often the pool manager samples planned queues' arrival counts.
SAMPLE_S = 0.05


def envelope(arrivals: Sequence[float], windows: Sequence[float] = WINDOWS_S) -> dict[float, int]:
    """The most of ``arrivals`` (sorted moments, in seconds) any window of each length held."""
    peaks = {}
    for window in windows:
        most, start = 0, 0
        for end, moment in enumerate(arrivals):
            while moment - arrivals[start] >= window:
                start += 1
            most = max(most, end - start + 1)
        peaks[window] = most
    return peaks


class LiveEnvelope:
    """The envelope of the arrivals a counter has seen, from samples of the counter, kept in
    constant time per sample: for each window, the arrivals since the first sample inside it,
    and the most of those over the history (a monotonic queue)."""

    def __init__(self, windows: Sequence[float] = WINDOWS_S, history_s: float = HISTORY_S) -> None:
        self._windows = tuple(windows)
        self._history_s = history_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        #: Per window: how many of ``_samples`` lie before its start.
        self._starts = dict.fromkeys(self._windows, 0)
        #: Per window: (moment, arrivals in the window ending then), the largest first.
        self._maxima: dict[float, collections.deque[tuple[float, int]]] = {
            w: collections.deque() for w in self._windows
        }

    def sample(self, now: float, count: int) -> None:
        """The counter read ``count`` at ``now`` (moments increase)."""
        self._samples.append((now, count))
        for window in self._windows:
            start = self._starts[window]
            # The first sample at or after the window's start (a float's error aside): the
            # arrivals since it are those of the window, to one sample's period.
            while self._samples[start][0] < now - window - 1e-9:
                start += 1
            self._starts[window] = start
            held = count - self._samples[start][1]
            maxima = self._maxima[window]
            while maxima and maxima[-1][1] <= held:
                maxima.pop()
            maxima.append((now, held))
            while maxima[0][0] < now - self._history_s:
                maxima.popleft()
        # Samples before every window's start are no longer read.
        unread = min(self._starts.values())
        for _ in range(unread):
            self._samples.popleft()
        if unread:
            self._starts = {w: s - unread for w, s in self._starts.items()}

    def peaks(self) -> dict[float, int]:
        """For each window length, the most arrivals a window that long held in the history."""
        return {w: (m[0][1] if m else 0) for w, m in self._maxima.items()}


class Tuner:
    """The replicas one planned model is asked to run, from its live envelope."""

    def __init__(
        self,
        planned_replicas: int,
        planned_peaks: Mapping[float, int],
        history_s: float = HISTORY_S,
        hold_s: float = HOLD_S,
    ) -> None:
        self.planned_replicas = planned_replicas
        #: A window the plan saw no arrival in still admits one before it counts as exceeded.
        self._planned = {w: max(1, int(n)) for w, n in planned_peaks.items()}
        self.envelope = LiveEnvelope(tuple(self._planned), max(history_s, *self._planned))
        self._hold_s = hold_s
        self.wanted = planned_replicas
        self._exceeded_at = -math.inf

    def update(self, now: float, arrived: int) -> int:
        """Take a sample of the model's arrival count; the replicas it should run now."""
        self.envelope.sample(now, arrived)
        observed = self.envelope.peaks()
        factor = max(observed[w] / self._planned[w] for w in self._planned)
        needed = max(self.planned_replicas, math.ceil(self.planned_replicas * factor))
        if needed > self.planned_replicas:
            self._exceeded_at = now
        if needed >= self.wanted:
            self.wanted = needed  # up at once
        elif now - self._exceeded_at >= self._hold_s:
            self.wanted = needed  # down once the traffic has been within the plan a while
        return self.wanted
