"""What the policy tests share: a query, and checks of what a policy selected or combined."""

from __future__ import annotations

from typing import Any

from ketch.policy import Combined, Query


def query(n: int = 0) -> Query:
    return Query(id=str(n), app="app", input=None)


def only(selected: Any) -> str:
    models: list[str] = list(selected)
    assert len(models) == 1, models
    return models[0]


def combined(result: Any) -> Combined:
    assert isinstance(result, Combined)
    return result
