"""Pipeline declarations (ketch.pipeline, ketch.parallel, ketch.when_unsure): what they accept,
what they refuse with a message naming the value, their plain-data form, and the joins of
parallel steps."""

from __future__ import annotations

from typing import Any

import pytest

import ketch
from ketch.applications.pipeline import join
from ketch.serving.jobs import PredictionError
from ketch.specs.pipelines import Parallel, PipelineSpec, Stage, WhenUnsure


def test_a_pipeline_of_every_kind_of_step_round_trips_through_plain_data() -> None:
    spec = ketch.pipeline(
        "captions",
        steps=[
            "detect",
            "crop:2",
            ketch.parallel("a", "b", join="vote"),
            ketch.when_unsure("big", below=0.8),
        ],
        slo_ms=200,
    )
    assert spec.steps == (
        Stage(model="detect"),
        Stage(model="crop:2"),
        Parallel(models_=("a", "b"), join="vote"),
        WhenUnsure(model="big", below=0.8),
    )
    assert spec.models() == ["detect", "crop:2", "a", "b", "big"]
    data = spec.to_dict()
    assert data["steps"][2] == {"step": "parallel", "models": ["a", "b"], "join": "vote"}
    assert data["steps"][3] == {"step": "when_unsure", "model": "big", "below": 0.8}
    assert PipelineSpec.from_dict(data) == spec


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ketch.pipeline("bad name!", steps=["a"]), "pipeline name 'bad name!'"),
        (lambda: ketch.pipeline("p", steps=[]), "steps of pipeline 'p' must be a non-empty"),
        (lambda: ketch.pipeline("p", steps="a"), "steps of pipeline 'p' must be a non-empty"),
        (lambda: ketch.pipeline("p", steps=["a", 3]), "step 2 of pipeline 'p' must be"),
        (lambda: ketch.pipeline("p", steps=["a b"]), "step 1 of pipeline 'p' names 'a b'"),
        (
            lambda: ketch.pipeline("p", steps=[ketch.when_unsure("b", below=0.5)]),
            "step 1 of pipeline 'p' is when_unsure('b'): it needs a step before it",
        ),
        (lambda: ketch.pipeline("p", steps=["a"], slo_ms=0), "slo_ms of pipeline 'p'"),
        (lambda: ketch.parallel("a"), "parallel needs two models or more"),
        (lambda: ketch.parallel("a", "a"), "parallel lists a model twice"),
        (lambda: ketch.parallel("a", "b", join="sum"), "join must be one of"),  # type: ignore[arg-type]
        (lambda: ketch.when_unsure("b", below=1.5), "below must be a confidence in (0, 1]"),
        (lambda: ketch.when_unsure("b", below=0), "below must be a confidence in (0, 1]"),
    ],
)
def test_a_wrong_declaration_is_refused_naming_what_is_wrong(make: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as refused:
        make()
    assert message in str(refused.value)


def test_plain_data_is_checked_as_a_declaration_is() -> None:
    with pytest.raises(ValueError, match="steps of pipeline 'p'"):
        PipelineSpec.from_dict({"name": "p", "steps": [{"step": "loop", "model": "a"}]})
    with pytest.raises(ValueError, match="parallel needs two models"):
        PipelineSpec.from_dict({"name": "p", "steps": [{"step": "parallel", "models": ["a"]}]})


def test_parallel_outputs_join_as_asked() -> None:
    models = ["a", "b", "c"]
    assert join("list", models, [1, 2, 2]) == [1, 2, 2]
    assert join("dict", models, [1, 2, 2]) == {"a": 1, "b": 2, "c": 2}
    assert join("mean", models, [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]) == [0.5, 0.5]
    assert join("mean", models, [1, 2, 6]) == 3.0
    assert join("vote", models, ["cat", "dog", "dog"]) == "dog"
    # Among equals, the first given wins; outputs compare as data, not as objects.
    assert join("vote", models, [{"x": 1, "y": 2}, "dog", {"y": 2, "x": 1}]) == {"x": 1, "y": 2}
    assert join("vote", models[:2], ["cat", "dog"]) == "cat"


def test_a_mean_of_what_is_not_numbers_is_a_500_that_shows_them() -> None:
    with pytest.raises(PredictionError) as refused:
        join("mean", ["a", "b"], ["cat", [1, 2]])
    assert refused.value.status == 500
    assert "cannot join the outputs of ['a', 'b'] by their mean" in refused.value.body["error"]
