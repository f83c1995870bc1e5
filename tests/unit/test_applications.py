"""Applications in process, over a real dispatcher whose workers answer through a FakeSink at
once (or never): what the built-in policies select, escalate to and combine, answers at the
deadline, and feedback reaching the policy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ketch.applications.catalog import Applications
from ketch.applications.runner import Application
from ketch.applications.state import FileStateStore
from ketch.errors import AppError
from ketch.observability.metrics import AppSample
from ketch.plugin_manager import load_plugins
from ketch.policy import Combined
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.specs.apps import AppSpec
from ketch.zmq_transport.broker import RemoteError
from ketch.zmq_transport.protocol import ErrorKind
from tests.unit.fakes import FakeSink, Sent, in_loop, make_spec, make_worker, receiver_of

#: What a model computes for one input; None: its worker never answers.
Answer = Callable[[Any], Any] | None


class Gateway:
    """Served models whose workers answer each batch from the loop, as replies arrive, and
    the applications over them."""

    def __init__(self, state_dir: Path) -> None:
        self.dispatcher = Dispatcher(lambda event: None)
        self.sink = FakeSink(self.dispatcher)
        self.sink.on_send = self._compute
        self.dispatcher.attach(self.sink)
        self._answers: dict[str, Answer] = {}
        self.apps = Applications(
            FileStateStore(state_dir),
            load_plugins(autoload=False),
            self.dispatcher,
            Deadlines(request_timeout_s=30.0),
        )

    def serve(self, name: str, answer: Answer) -> None:
        spec = make_spec(name=name)
        self.dispatcher.add_model(spec)
        self._answers[name] = answer
        self.sink.join(make_worker(spec, capacity=8))

    def add(self, models: list[str], policy: str = "single", **options: Any) -> Application:
        data = {"name": "app", "models": models, "policy": policy, **options}
        if "default_output" in options:
            data["has_default_output"] = True
        return self.apps.add(AppSpec.from_dict(data))

    def asked(self, name: str) -> list[Any]:
        """The inputs model ``name`` was sent."""
        return [x for b in self.sink.sent if b.worker.spec.name == name for x in b.inputs]

    def _compute(self, batch: Sent) -> None:
        answer = self._answers[batch.worker.spec.name]
        if answer is None:
            return
        loop = asyncio.get_running_loop()  # replies arrive from the loop, as the broker's do
        try:
            outputs = [answer(x) for x in batch.inputs]
        except Exception as exc:
            error = RemoteError(ErrorKind.MODEL, type(exc).__name__, str(exc))
            loop.call_soon(
                receiver_of(batch.worker).batch_failed, batch.worker, batch.batch_id, error
            )
        else:
            loop.call_soon(
                receiver_of(batch.worker).batch_replied,
                batch.worker,
                batch.batch_id,
                outputs,
                0.001,
            )


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


def fails(x: Any) -> Any:
    raise ValueError(f"cannot handle {x!r}")


@in_loop
async def test_single_answers_with_its_one_models_prediction(gateway: Gateway) -> None:
    gateway.serve("double", lambda x: 2 * x)
    app = gateway.add(["double"])
    answer = await app.predict(3, None)
    assert {k: answer[k] for k in ("output", "models", "default", "missing")} == {
        "output": 6,
        "models": ["double"],
        "default": False,
        "missing": {},
    }
    assert answer["query_id"] and answer["app"] == "app"
    assert app.describe()["queries"] == 1


@in_loop
async def test_ensemble_asks_every_model_and_combines_their_answers(gateway: Gateway) -> None:
    gateway.serve("low", lambda x: x - 1.0)
    gateway.serve("high", lambda x: x + 1.0)
    app = gateway.add(["low", "high"], "ensemble")
    answer = await app.predict(2.0, None)
    assert answer["output"] == pytest.approx(2.0)  # the mean of 1 and 3
    assert answer["confidence"] == pytest.approx(0.5)  # 1 / (1 + their spread of 1)
    assert answer["models"] == ["low", "high"]
    assert (gateway.asked("low"), gateway.asked("high")) == ([2.0], [2.0])
    assert app.policy.state_dict() == {"combined": 1, "answered": {"low": 1, "high": 1}}


@in_loop
async def test_an_ensemble_answers_at_its_deadline_without_the_late_model(
    gateway: Gateway,
) -> None:
    gateway.serve("fast", lambda x: 10.0)
    gateway.serve("stuck", None)
    app = gateway.add(["fast", "stuck"], "ensemble", slo_ms=30)
    answer = await app.predict(1, None)
    assert (answer["output"], answer["models"]) == (10.0, ["fast"])
    assert answer["missing"] == {"stuck": "no answer within 30 ms"}
    assert gateway.asked("stuck") == [1]  # it was asked, and never answered


@pytest.mark.parametrize(
    ("small_confidence", "answered_by", "asked_big"),
    [(0.99, "small", []), (0.6, "big", ["photo"])],
)
@in_loop
async def test_a_cascade_asks_the_costlier_model_only_when_the_cheap_one_is_unsure(
    gateway: Gateway, small_confidence: float, answered_by: str, asked_big: list[str]
) -> None:
    gateway.serve("small", lambda x: {"label": "cat", "confidence": small_confidence})
    gateway.serve("big", lambda x: {"label": "dog", "confidence": 0.95})
    app = gateway.add(["small", "big"], "cascade", params={"threshold": 0.9})
    answer = await app.predict("photo", None)
    expected = {"small": {"label": "cat", "confidence": small_confidence}}
    expected["big"] = {"label": "dog", "confidence": 0.95}
    assert answer["output"] == expected[answered_by]
    assert answer["confidence"] == expected[answered_by]["confidence"]
    assert gateway.asked("big") == asked_big
    assert app.policy.state_dict()["answered_by"][answered_by] == 1


@in_loop
async def test_a_cascade_stage_that_fails_is_passed_over(gateway: Gateway) -> None:
    gateway.serve("small", fails)
    gateway.serve("big", lambda x: {"label": "dog", "confidence": 0.95})
    app = gateway.add(["small", "big"], "cascade")
    answer = await app.predict("photo", None)
    assert answer["output"] == {"label": "dog", "confidence": 0.95}
    assert answer["models"] == ["big"]
    assert answer["missing"] == {
        "small": "500: model 'small:1' raised ValueError: cannot handle 'photo'"
    }


@in_loop
async def test_no_model_in_time_gives_the_default_output(gateway: Gateway) -> None:
    gateway.serve("stuck", None)
    app = gateway.add(["stuck"], slo_ms=20, default_output="unknown")
    answer = await app.predict(1, None)
    assert (answer["output"], answer["default"], answer["models"]) == ("unknown", True, [])
    assert answer["missing"] == {"stuck": "no answer within 20 ms"}
    assert answer["explanation"] == (
        "no model answered within 20 ms (stuck: no answer within 20 ms)"
    )
    assert gateway.apps.samples() == [AppSample("app", 1)]
    assert app.describe()["defaults"] == 1


@in_loop
async def test_a_requests_own_timeout_overrides_the_applications_slo(gateway: Gateway) -> None:
    gateway.serve("stuck", None)
    app = gateway.add(["stuck"], slo_ms=60_000, default_output=None)
    answer = await app.predict(1, timeout_ms=20)
    assert (answer["output"], answer["default"]) == (None, True)
    assert answer["missing"] == {"stuck": "no answer within 20 ms"}


@in_loop
async def test_without_a_default_output_no_answer_in_time_is_an_error(gateway: Gateway) -> None:
    gateway.serve("stuck", None)
    gateway.serve("broken", fails)
    app = gateway.add(["stuck"], slo_ms=20)
    with pytest.raises(PredictionError) as late:
        await app.predict(1, None)
    assert late.value.status == 504
    assert late.value.body["error"] == (
        "application 'app': no model answered within 20 ms (stuck: no answer within 20 ms), "
        "and it has no default_output"
    )
    gateway.apps.remove("app")
    app = gateway.add(["stuck", "broken"], "ensemble", slo_ms=20)
    with pytest.raises(PredictionError) as mixed:
        await app.predict(1, None)
    assert mixed.value.status == 503  # a timeout and a failure: no one status says it all
    assert app.describe()["errors"] == 1


@in_loop
async def test_feedback_with_a_reward_reaches_the_policy(gateway: Gateway) -> None:
    gateway.serve("a", lambda x: "A")
    gateway.serve("b", lambda x: "B")
    app = gateway.add(["a", "b"], "epsilon_greedy", params={"epsilon": 0.0, "seed": 1})
    answer = await app.predict(1, None)
    (used,) = answer["models"]
    taught = await app.feedback(answer["query_id"], 0.8, None, has_label=False)
    assert taught["rewards"] == {used: 0.8}
    state = app.describe()["policy_state"]
    assert state["pulls"][used] == 1
    assert state["mean_reward"][used] == pytest.approx(0.8)
    assert app.describe()["feedback"] == 1
    with pytest.raises(PredictionError) as again:
        await app.feedback(answer["query_id"], 1.0, None, has_label=False)
    assert again.value.status == 409
    with pytest.raises(PredictionError) as unknown:
        await app.feedback("no-such-query", 1.0, None, has_label=False)
    assert unknown.value.status == 404


@in_loop
async def test_feedback_with_a_label_rewards_each_models_own_prediction(gateway: Gateway) -> None:
    gateway.serve("right", lambda x: x * 2)
    gateway.serve("wrong", lambda x: x * 3)
    app = gateway.add(["right", "wrong"], "ensemble", params={"method": "vote"})
    answer = await app.predict(2, None)
    taught = await app.feedback(answer["query_id"], None, 4, has_label=True)
    assert taught["rewards"] == {"right": 1.0, "wrong": 0.0}
    assert taught["reward"] == (1.0 if answer["output"] == 4 else 0.0)


@in_loop
async def test_a_shadow_is_asked_and_compared_but_never_answers_the_client(
    gateway: Gateway,
) -> None:
    gateway.serve("live", lambda x: x + 1)
    gateway.serve("candidate", lambda x: x + 1)
    app = gateway.add(["live", "candidate"], "shadow")
    answer = await app.predict(1, None)
    assert (answer["output"], answer["models"]) == (2, ["live"])
    assert gateway.asked("candidate") == [1]
    for _ in range(100):  # the comparison runs on the loop once the shadow answered
        if app.policy.state_dict()["shadows"]["candidate"]["compared"]:
            break
        await asyncio.sleep(0)
    assert app.policy.state_dict()["shadows"]["candidate"]["agreed"] == 1


@in_loop
async def test_a_shadow_that_never_answers_does_not_delay_the_answer(gateway: Gateway) -> None:
    gateway.serve("live", lambda x: x + 1)
    gateway.serve("candidate", None)
    app = gateway.add(["live", "candidate"], "shadow", slo_ms=60_000)
    answer = await asyncio.wait_for(app.predict(1, None), 1.0)
    assert answer["output"] == 2


def test_an_application_listing_a_model_not_served_is_refused(gateway: Gateway) -> None:
    gateway.serve("a", lambda x: x)
    with pytest.raises(
        AppError, match="application 'app' lists 'b': Request for unknown model: 'b' is not found"
    ):
        gateway.add(["a", "b"], "ensemble")
    with pytest.raises(AppError, match="policy 'single' rejects its models"):
        gateway.add(["a", "a:1"])
    assert len(gateway.apps) == 0


@in_loop
async def test_the_models_combine_names_are_the_answers_and_must_have_answered(
    gateway: Gateway,
) -> None:
    gateway.serve("a", lambda x: 1.0)
    gateway.serve("b", lambda x: 0.0)
    app = gateway.add(["a", "b"], "ensemble")
    assert (await app.predict(1, None))["models"] == ["a", "b"]  # None: every one combined
    app.policy.combine = lambda query, predictions: Combined(1.0, None, ("b",))  # type: ignore[method-assign]
    assert (await app.predict(1, None))["models"] == ["b"]
    app.policy.combine = lambda query, predictions: Combined(1.0, None, ("c",))  # type: ignore[method-assign]
    with pytest.raises(PredictionError) as refused:
        await app.predict(1, None)
    assert refused.value.status == 500
    assert "named the models ('c',) as making its output" in refused.value.body["error"]
