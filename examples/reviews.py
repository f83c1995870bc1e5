"""Two sentiment models behind one application that learns which to trust.

ketch serve examples/reviews.py
curl -d '{"input": "great food"}' localhost:8000/apps/reviews/predict
curl -d '{"query_id": "...", "label": 1}' localhost:8000/apps/reviews/feedback
curl localhost:8000/apps
"""

from __future__ import annotations

import ketch

POSITIVE = {"great", "good", "tasty", "friendly", "lovely", "excellent"}
NEGATIVE = {"bad", "cold", "rude", "slow", "awful", "bland"}


@ketch.model
def sentiment_small(texts: list[str]) -> list[float]:
    """Counts positive words only: cheap, and blind to complaints."""
    return [min(1.0, 0.5 + 0.25 * len(set(t.lower().split()) & POSITIVE)) for t in texts]


@ketch.model
def sentiment_large(texts: list[str]) -> list[float]:
    """Weighs positive against negative words."""
    scores = []
    for text in texts:
        words = set(text.lower().split())
        balance = len(words & POSITIVE) - len(words & NEGATIVE)
        scores.append(min(1.0, max(0.0, 0.5 + 0.25 * balance)))
    return scores


reviews = ketch.app(
    "reviews",
    models=["sentiment_small", "sentiment_large"],
    policy="exp3",
    slo_ms=500,
    default_output=0.5,
)
