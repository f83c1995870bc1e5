"""Unit tests for ``ketch.runtimes.python`` and the worker's wrapping of it
(``ketch.worker.predict``): running a ``@ketch.model`` function on a batch as a worker does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import ketch
from ketch.errors import BatchInputError, BatchOutputError
from ketch.runtimes.python import PythonRuntime
from ketch.specs.models import Model
from ketch.types import Outputs
from ketch.worker.predict import batch_predict, checked_outputs


def worker_predict(model: Model[..., Any]) -> Callable[[list[Any]], Outputs]:
    """What a worker serving ``model`` calls on each batch: its python runtime, wrapped."""
    runtime = PythonRuntime.of(model)
    predict = batch_predict(runtime, runtime.announced_spec(None))
    return lambda inputs: predict(inputs, None)  # a batch without request parameters


@pytest.fixture
def loops() -> Iterator[list[asyncio.AbstractEventLoop]]:
    """Event loops seen by async models; closed at the end, as a worker's exit would."""
    seen: list[asyncio.AbstractEventLoop] = []
    yield seen
    for loop in set(seen):
        loop.close()


# --- list models -----------------------------------------------------------------------------


def test_list_model_receives_the_inputs_as_a_list() -> None:
    received: list[Any] = []

    @ketch.model
    def lengths(texts: list[str]) -> list[int]:
        received.append(texts)
        return [len(t) for t in texts]

    predict = worker_predict(lengths)
    assert predict(["a", "bcd", ""]) == [1, 3, 0]
    assert received == [["a", "bcd", ""]]
    assert type(received[0]) is list


def test_list_model_gets_heterogeneous_inputs_unchanged() -> None:
    inputs = [{"text": "x"}, [1, 2, 3], None]

    @ketch.model
    def identity(batch: list[Any]) -> list[Any]:
        return batch

    assert worker_predict(identity)(inputs) == inputs


def test_tuple_outputs_become_lists() -> None:
    @ketch.model
    def as_tuple(batch: list[int]) -> tuple[int, ...]:
        return tuple(x * 2 for x in batch)

    outputs = worker_predict(as_tuple)([1, 2])
    assert outputs == [2, 4]
    assert type(outputs) is list


def test_single_input_batch() -> None:
    @ketch.model
    def negate(batch: list[int]) -> list[int]:
        return [-x for x in batch]

    assert worker_predict(negate)([5]) == [-5]


# --- numpy models ----------------------------------------------------------------------------


def test_numpy_model_receives_one_stacked_array() -> None:
    received: list[Any] = []

    @ketch.model
    def total(batch: np.ndarray) -> np.ndarray:
        received.append(batch)
        return batch.sum(axis=1)

    outputs = worker_predict(total)([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    (batch,) = received
    assert isinstance(batch, np.ndarray)
    assert batch.shape == (3, 2)
    np.testing.assert_array_equal(batch, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert isinstance(outputs, np.ndarray)
    np.testing.assert_array_equal(outputs, [3.0, 7.0, 11.0])


def test_numpy_model_stacks_array_inputs_along_a_new_first_axis() -> None:
    received: list[np.ndarray] = []

    @ketch.model
    def first_pixel(images: np.ndarray) -> list[float]:
        received.append(images)
        return [float(image[0, 0]) for image in images]

    inputs = [np.full((2, 2), i, dtype=np.float32) for i in range(4)]
    assert worker_predict(first_pixel)(inputs) == [0.0, 1.0, 2.0, 3.0]
    assert received[0].shape == (4, 2, 2)
    assert received[0].dtype == np.float32


def test_numpy_model_may_return_a_list() -> None:
    @ketch.model
    def labels(batch: np.ndarray) -> list[str]:
        return ["big" if x > 1 else "small" for x in batch]

    assert worker_predict(labels)([0.5, 2.0]) == ["small", "big"]


def test_ragged_numpy_inputs_raise_batch_input_error() -> None:
    calls: list[Any] = []

    @ketch.model
    def total(batch: np.ndarray) -> np.ndarray:
        calls.append(batch)
        return batch.sum(axis=1)

    with pytest.raises(BatchInputError, match=r"inputs for model 'total:1' cannot be stacked"):
        worker_predict(total)([[1, 2], [3]])
    assert calls == []  # the model never saw a malformed batch


def test_inputs_of_different_array_shapes_raise_batch_input_error() -> None:
    @ketch.model(name="images")
    def images(batch: np.ndarray) -> np.ndarray:
        return batch

    with pytest.raises(BatchInputError, match="'images:1'"):
        worker_predict(images)([np.zeros((2, 2)), np.zeros((3, 2))])


def test_ragged_inputs_are_fine_for_a_list_model() -> None:
    @ketch.model
    def sizes(batch: list[list[int]]) -> list[int]:
        return [len(x) for x in batch]

    assert worker_predict(sizes)([[1, 2], [3]]) == [2, 1]


# --- async models ----------------------------------------------------------------------------


def test_async_model_is_awaited(loops: list[asyncio.AbstractEventLoop]) -> None:
    @ketch.model
    async def shout(texts: list[str]) -> list[str]:
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return [t.upper() for t in texts]

    assert worker_predict(shout)(["hi", "there"]) == ["HI", "THERE"]


def test_async_model_keeps_one_event_loop_across_batches(
    loops: list[asyncio.AbstractEventLoop],
) -> None:
    @ketch.model
    async def remember(batch: list[int]) -> list[int]:
        loops.append(asyncio.get_running_loop())
        return batch

    predict = worker_predict(remember)
    predict([1])
    predict([2])
    predict([3])
    assert len(loops) == 3
    assert len(set(loops)) == 1
    assert not loops[0].is_closed()


def test_async_numpy_model(loops: list[asyncio.AbstractEventLoop]) -> None:
    @ketch.model
    async def double(batch: np.ndarray) -> np.ndarray:
        loops.append(asyncio.get_running_loop())
        return batch * 2

    outputs = worker_predict(double)([1, 2, 3])
    np.testing.assert_array_equal(outputs, [2, 4, 6])


def test_async_model_wrong_output_count_is_checked(
    loops: list[asyncio.AbstractEventLoop],
) -> None:
    @ketch.model
    async def short(batch: list[int]) -> list[int]:
        loops.append(asyncio.get_running_loop())
        return batch[:1]

    with pytest.raises(BatchOutputError, match="returned 1 outputs for a batch of 2 inputs"):
        worker_predict(short)([1, 2])


def test_async_model_exception_propagates(loops: list[asyncio.AbstractEventLoop]) -> None:
    @ketch.model
    async def failing(batch: list[int]) -> list[int]:
        loops.append(asyncio.get_running_loop())
        raise LookupError("no such user")

    predict = worker_predict(failing)
    with pytest.raises(LookupError, match="no such user"):
        predict([1])
    with pytest.raises(LookupError, match="no such user"):  # the loop survives a failure
        predict([2])
    assert len(set(loops)) == 1


# --- output checks ---------------------------------------------------------------------------


def test_model_exception_propagates_unchanged() -> None:
    @ketch.model
    def broken(batch: list[int]) -> list[int]:
        raise ZeroDivisionError("division by zero in the model")

    with pytest.raises(ZeroDivisionError, match="division by zero in the model"):
        worker_predict(broken)([1])


@pytest.mark.parametrize(("returned", "batch_size"), [(0, 3), (2, 3), (4, 3), (1, 2), (0, 1)])
def test_wrong_output_count_names_both_counts(returned: int, batch_size: int) -> None:
    @ketch.model(name="counter")
    def counter(batch: list[int]) -> list[int]:
        return [0] * returned

    with pytest.raises(BatchOutputError) as info:
        worker_predict(counter)(list(range(batch_size)))
    message = str(info.value)
    assert f"returned {returned} outputs for a batch of {batch_size} inputs" in message
    assert "'counter:1'" in message


def test_wrong_length_array_output_names_both_counts() -> None:
    @ketch.model
    def flattened(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(-1)

    with pytest.raises(BatchOutputError, match="returned 4 outputs for a batch of 2 inputs"):
        worker_predict(flattened)([[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(1.5, "float"), (7, "int"), (None, "NoneType"), ("ab", "str"), ({"a": 1}, "dict")],
)
def test_non_sequence_output_is_refused_naming_its_type(value: Any, type_name: str) -> None:
    @ketch.model(name="scalar")
    def scalar(batch: list[int]) -> Any:
        return value

    with pytest.raises(BatchOutputError, match=rf"'scalar:1' returned {type_name};"):
        worker_predict(scalar)([1, 2])


def test_generator_output_is_refused() -> None:
    @ketch.model
    def lazy(batch: list[int]) -> Any:
        return (x for x in batch)

    with pytest.raises(BatchOutputError, match="returned generator; return a list or array"):
        worker_predict(lazy)([1, 2])


def test_zero_dimensional_array_output_is_refused() -> None:
    @ketch.model
    def summed(batch: np.ndarray) -> np.ndarray:
        return np.array(batch.sum())

    with pytest.raises(BatchOutputError, match="0-d array"):
        worker_predict(summed)([1, 2])


def test_checked_outputs_keeps_arrays_as_arrays() -> None:
    array = np.arange(3)
    assert checked_outputs(array, 3, "m:1") is array


def test_checked_outputs_accepts_empty_batch() -> None:
    assert checked_outputs([], 0, "m:1") == []
