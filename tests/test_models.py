"""Unit tests for ``ketch.specs.models``: the ``@ketch.model`` decorator and ``ModelSpec``."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import ketch
from ketch.specs.models import DEFAULT_MAX_BATCH_SIZE, DEFAULT_VERSION, Model, ModelSpec
from ketch.specs.signature import TensorSpec


def _import_source(tmp_path: Path, source: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``source`` as a fresh module, exactly as a user's file would be imported."""
    name = f"ketch_test_models_{uuid.uuid4().hex}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


# --- the decorator, bare and with arguments -------------------------------------------------


def test_bare_decorator_uses_function_name_and_defaults() -> None:
    @ketch.model
    def sentiment(texts: list[str]) -> list[float]:
        return [float(len(t)) for t in texts]

    assert isinstance(sentiment, Model)
    assert sentiment.spec == ModelSpec(
        name="sentiment",
        version=DEFAULT_VERSION,
        max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        batch_input="list",
        is_async=False,
        # Unenforced, for the Open Inference Protocol's metadata.
        hinted_inputs=(TensorSpec("input_0", "str", ()),),
        hinted_outputs=(TensorSpec("output_0", "float64", ()),),
    )
    assert sentiment.spec.key == ("sentiment", "1")
    assert sentiment.spec.label() == "sentiment:1"


def test_decorator_with_arguments_sets_spec() -> None:
    @ketch.model(name="reviews-v2", version="2024.1", max_batch_size=8)
    def sentiment(texts: list[str]) -> list[float]:
        return [0.5] * len(texts)

    assert sentiment.spec.name == "reviews-v2"
    assert sentiment.spec.version == "2024.1"
    assert sentiment.spec.max_batch_size == 8
    assert sentiment.spec.label() == "reviews-v2:2024.1"


def test_decorator_with_empty_parentheses_is_like_bare() -> None:
    @ketch.model()
    def echo(batch: list[int]) -> list[int]:
        return batch

    hinted = (TensorSpec("input_0", "int64", ()),), (TensorSpec("output_0", "int64", ()),)
    assert echo.spec == ModelSpec(name="echo", hinted_inputs=hinted[0], hinted_outputs=hinted[1])


@pytest.mark.parametrize(("version", "expected"), [(2, "2"), (0, "0"), (10, "10"), ("3", "3")])
def test_integer_versions_become_strings(version: int | str, expected: str) -> None:
    @ketch.model(version=version)
    def echo(batch: list[int]) -> list[int]:
        return batch

    assert echo.spec.version == expected
    assert echo.spec.key == ("echo", expected)


def test_model_stays_callable_as_the_plain_function() -> None:
    calls: list[list[int]] = []

    def double(batch: list[int], *, factor: int = 2) -> list[int]:
        """Double every input."""
        calls.append(batch)
        return [x * factor for x in batch]

    decorated = ketch.model(double)

    assert decorated([1, 2, 3]) == [2, 4, 6]
    assert decorated([1], factor=10) == [10]
    assert calls == [[1, 2, 3], [1]]
    assert decorated.fn is double
    assert decorated.__name__ == "double"
    assert decorated.__doc__ == "Double every input."
    assert decorated.__wrapped__ is double
    assert "double:1" in repr(decorated)


def test_decorating_a_model_twice_is_refused() -> None:
    @ketch.model
    def echo(batch: list[int]) -> list[int]:
        return batch

    with pytest.raises(TypeError, match="already a ketch model"):
        ketch.model(echo)
    with pytest.raises(TypeError, match="already a ketch model"):
        ketch.model(name="again")(echo)


def test_decorating_a_non_callable_is_refused() -> None:
    with pytest.raises(TypeError, match=r"decorates a function, got 42"):
        ketch.model(42)  # type: ignore[call-overload]


# --- validation at decoration time -----------------------------------------------------------


def _batch(batch: list[int]) -> list[int]:
    return batch


@pytest.mark.parametrize(
    "name", ["", "has space", "slash/name", "-leading-dash", "x" * 129, "ünïcode", "a?b"]
)
def test_bad_name_fails_at_decoration_naming_the_value(name: str) -> None:
    with pytest.raises(ValueError, match="model name") as info:
        ketch.model(name=name)(_batch)
    assert repr(name) in str(info.value)


def test_lambda_without_name_fails_naming_the_lambda() -> None:
    with pytest.raises(ValueError, match=r"model name '<lambda>' is not valid"):
        ketch.model(lambda batch: batch)


def test_longest_valid_name_is_accepted() -> None:
    assert ketch.model(name="x" * 128)(_batch).spec.name == "x" * 128


@pytest.mark.parametrize(
    ("version", "shown"),
    [("", "''"), ("1 0", "'1 0'"), ("v/2", "'v/2'"), (-1, "'-1'"), (True, "True"), (1.5, "1.5")],
)
def test_bad_version_fails_at_decoration_naming_the_value(version: Any, shown: str) -> None:
    with pytest.raises(ValueError, match="model version") as info:
        ketch.model(name="m", version=version)(_batch)
    assert f"model version {shown} of 'm' is not valid" in str(info.value)


@pytest.mark.parametrize("size", [-1, -3])
def test_max_batch_size_below_zero_fails_naming_the_value(size: int) -> None:
    with pytest.raises(
        ValueError, match=rf"max_batch_size of 'm' must be >= 1, or 0 .* got {size}"
    ):
        ketch.model(name="m", max_batch_size=size)(_batch)


def test_max_batch_size_zero_is_a_model_without_a_batch_axis() -> None:
    spec = ketch.model(name="m", max_batch_size=0)(_batch).spec
    assert not spec.has_batch_axis
    assert spec.batch_limit == 1


@pytest.mark.parametrize("timeout", [0, -1.0, "5", True, float("nan")])
def test_a_stall_timeout_that_is_not_a_positive_number_fails_naming_it(timeout: Any) -> None:
    with pytest.raises(ValueError, match="stall_timeout_s of 'm' must be a number of seconds > 0"):
        ketch.model(name="m", stall_timeout_s=timeout)(_batch)


def test_a_stall_timeout_is_kept_in_the_spec() -> None:
    assert ketch.model(name="m", stall_timeout_s=2)(_batch).spec.stall_timeout_s == 2.0


@pytest.mark.parametrize("size", [2.0, "8", True, None])
def test_max_batch_size_of_wrong_type_fails_naming_the_value(size: Any) -> None:
    with pytest.raises(TypeError, match="max_batch_size of 'm' must be an int") as info:
        ketch.model(name="m", max_batch_size=size)(_batch)
    assert repr(size) in str(info.value)


def test_function_without_a_batch_parameter_is_refused() -> None:
    def no_args() -> list[int]:
        return []

    with pytest.raises(TypeError, match=r"no_args\(\).*must accept the batch"):
        ketch.model(no_args)


def test_function_needing_two_arguments_is_refused() -> None:
    def two(batch: list[int], other: int) -> list[int]:
        return batch

    with pytest.raises(TypeError, match=r"two\(batch: 'list\[int\]', other: 'int'\)"):
        ketch.model(two)


def test_function_with_keyword_only_batch_is_refused() -> None:
    def keyword_only(*, batch: list[int]) -> list[int]:
        return batch

    with pytest.raises(TypeError, match="must accept the batch as its one positional argument"):
        ketch.model(keyword_only)


def test_function_with_varargs_or_defaults_is_accepted() -> None:
    def varargs(*batches: list[int]) -> list[int]:
        return batches[0]

    def extra_default(batch: list[int], scale: int = 1) -> list[int]:
        return batch

    assert ketch.model(varargs)([1]) == [1]
    assert ketch.model(extra_default).spec.name == "extra_default"


def test_validation_error_names_the_model_for_each_option() -> None:
    with pytest.raises(ValueError, match="'classifier'"):
        ketch.model(name="classifier", max_batch_size=-1)(_batch)


# --- batch_input detection -------------------------------------------------------------------


def test_list_annotation_means_list_batch() -> None:
    @ketch.model
    def lists(batch: list[float]) -> list[float]:
        return batch

    assert lists.spec.batch_input == "list"


def test_unannotated_batch_means_list_batch() -> None:
    @ketch.model
    def plain(batch):  # type: ignore[no-untyped-def]
        return batch

    assert plain.spec.batch_input == "list"


def test_ndarray_annotation_means_numpy_batch() -> None:
    @ketch.model
    def arrays(batch: np.ndarray) -> np.ndarray:
        return batch

    assert arrays.spec.batch_input == "numpy"


def test_parametrised_ndarray_annotation_means_numpy_batch() -> None:
    @ketch.model
    def arrays(batch: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray:
        return batch

    assert arrays.spec.batch_input == "numpy"


def test_npt_ndarray_annotation_means_numpy_batch() -> None:
    @ketch.model
    def arrays(batch: npt.NDArray[np.float32]) -> list[float]:
        return list(batch)

    assert arrays.spec.batch_input == "numpy"


def test_list_of_arrays_annotation_means_list_batch() -> None:
    @ketch.model
    def lists(batch: list[np.ndarray]) -> list[float]:
        return [0.0] * len(batch)

    assert lists.spec.batch_input == "list"


def test_string_annotations_under_future_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This file also uses `from __future__ import annotations`, but a module of its own makes
    # sure the annotations are strings that have to be resolved in the user's globals.
    module = _import_source(
        tmp_path,
        """
        from __future__ import annotations

        import numpy as np
        import numpy.typing as npt
        import ketch

        @ketch.model
        def with_ndarray(batch: np.ndarray) -> np.ndarray:
            return batch

        @ketch.model
        def with_npt(batch: npt.NDArray[np.float64]) -> list[float]:
            return list(batch)

        @ketch.model
        def with_list(batch: list[float]) -> list[float]:
            return batch

        @ketch.model
        def with_list_of_arrays(batch: list[np.ndarray]) -> list[float]:
            return [0.0] * len(batch)
        """,
        monkeypatch,
    )
    assert isinstance(inspect.signature(module.with_ndarray.fn).parameters["batch"].annotation, str)
    assert module.with_ndarray.spec.batch_input == "numpy"
    assert module.with_npt.spec.batch_input == "numpy"
    assert module.with_list.spec.batch_input == "list"
    assert module.with_list_of_arrays.spec.batch_input == "list"


def test_unresolvable_string_annotations_fall_back_to_the_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _import_source(
        tmp_path,
        """
        from __future__ import annotations

        from typing import TYPE_CHECKING

        import ketch

        if TYPE_CHECKING:
            import numpy as np
            import numpy.typing as npt

        @ketch.model
        def with_ndarray(batch: np.ndarray) -> np.ndarray:
            return batch

        @ketch.model
        def with_npt(batch: npt.NDArray[np.float64]) -> list[float]:
            return list(batch)

        @ketch.model
        def with_floats(batch: list[float]) -> list[float]:
            return batch
        """,
        monkeypatch,
    )
    assert module.with_ndarray.spec.batch_input == "numpy"
    assert module.with_npt.spec.batch_input == "numpy"
    assert module.with_floats.spec.batch_input == "list"


def test_list_of_arrays_stays_list_when_another_annotation_is_unresolvable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch annotation is resolvable; only the return type names a TYPE_CHECKING import.
    # The model must still get its batch as a list, as it does without the return annotation.
    module = _import_source(
        tmp_path,
        """
        from __future__ import annotations

        from typing import TYPE_CHECKING

        import numpy as np
        import ketch

        if TYPE_CHECKING:
            from decimal import Decimal

        @ketch.model
        def scores(batch: list[np.ndarray]) -> list[Decimal]:
            return [0] * len(batch)
        """,
        monkeypatch,
    )
    assert module.scores.spec.batch_input == "list"


# --- async detection -------------------------------------------------------------------------


def test_async_function_is_detected() -> None:
    @ketch.model
    async def remote(batch: list[str]) -> list[str]:
        return batch

    @ketch.model(name="remote_arrays")
    async def remote_arrays(batch: np.ndarray) -> np.ndarray:
        return batch

    assert remote.spec.is_async is True
    assert remote_arrays.spec.is_async is True
    assert remote_arrays.spec.batch_input == "numpy"


def test_sync_function_is_not_async() -> None:
    @ketch.model
    def local(batch: list[str]) -> list[str]:
        return batch

    assert local.spec.is_async is False


# --- ModelSpec as plain data -----------------------------------------------------------------


def test_spec_to_dict_is_plain_data() -> None:
    spec = ketch.model(name="m", version=3, max_batch_size=4)(_batch).spec
    assert spec.to_dict() == {
        "name": "m",
        "version": "3",
        "max_batch_size": 4,
        "batch_input": "list",
        "is_async": False,
        "takes_params": False,
        "max_delay_ms": 0.0,
        "slo_ms": None,
        "max_queue": 4096,
        "cache_size": None,
        "stall_timeout_s": None,
        "sequence": False,
        "sequence_idle_timeout_s": 60.0,
        "pool": {
            "min_replicas": 0,
            "max_replicas": 1,
            "idle_timeout_s": 300.0,
            "target_inflight": 64,
            "cold_start_timeout_s": 60.0,
        },
        "resources": {"cpus": None, "memory_mb": None, "threads": None, "gpus": None},
        "start": {
            "preload": False,
            "python": None,
            "env": None,
            "placement": {"resources": {}, "strategy": "spread"},
        },
        "runtime": "python",
        "artifact": None,
        "options": {},
        "inputs": [],
        "outputs": [],
        "runtime_info": {},
        "hinted_inputs": [{"name": "input_0", "datatype": "int64", "shape": []}],
        "hinted_outputs": [{"name": "output_0", "datatype": "int64", "shape": []}],
    }


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(name="m"),
        ModelSpec(name="a.b-c_d", version="2024.01", max_batch_size=1, batch_input="numpy"),
        ModelSpec(name="async_one", version="7", max_batch_size=512, is_async=True),
        ModelSpec(
            name="deployed",
            runtime="torch",
            artifact="/models/m.pt2",
            options={"device": "cpu"},
            inputs=(TensorSpec("x", "float32", (3, -1)),),
            outputs=(TensorSpec("y", "int64", ()),),
        ),
    ],
)
def test_spec_round_trips_through_dict(spec: ModelSpec) -> None:
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_from_dict_ignores_keys_a_newer_peer_adds() -> None:
    data = {**ModelSpec(name="m", version="2").to_dict(), "gpu": True, "future_field": [1, 2]}
    assert ModelSpec.from_dict(data) == ModelSpec(name="m", version="2")


def test_from_dict_fills_defaults_for_missing_optional_keys() -> None:
    assert ModelSpec.from_dict({"name": "m"}) == ModelSpec(name="m")


def test_from_dict_validates_like_the_decorator() -> None:
    with pytest.raises(ValueError, match="model name 'bad name'"):
        ModelSpec.from_dict({"name": "bad name"})
    with pytest.raises(ValueError, match="batch_input of 'm' must be 'list' or 'numpy'"):
        ModelSpec.from_dict({"name": "m", "batch_input": "torch"})
    with pytest.raises(ValueError, match="max_batch_size of 'm' must be >= 1, or 0"):
        ModelSpec.from_dict({"name": "m", "max_batch_size": -2})


def test_from_dict_accepts_integer_version() -> None:
    assert ModelSpec.from_dict({"name": "m", "version": 5}).version == "5"


def test_placement_names_what_ray_must_find_and_refuses_what_it_cannot_use() -> None:
    @ketch.model(placement={"resources": {"red": 0.5}, "strategy": "pack"})
    def placed(xs: list[int]) -> list[int]:
        return xs

    assert placed.spec.start.placement.resources == {"red": 0.5}
    assert placed.spec.start.placement.strategy == "pack"
    with pytest.raises(ValueError, match=r"Invalid enum value 'everywhere' - at `\$.strategy`"):
        ketch.model(placement={"strategy": "everywhere"})(lambda xs: xs)
    with pytest.raises(ValueError, match=r"amounts > 0 \('red': 0.0\)"):
        ketch.model(placement={"resources": {"red": 0}})(lambda xs: xs)
