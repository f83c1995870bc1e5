"""The models of Triton's own example clients, declared as ketch models, so those clients run
against ``ketch serve`` unmodified (``docs/protocols.md``)::

    ketch serve examples/triton_models.py          # HTTP on 8000, gRPC on 8001
    python simple_grpc_infer_client.py             # from triton-inference-server/client
    python simple_http_infer_client.py -u localhost:8000

Each declares its tensors as Triton's model configuration would (``inputs=``/``outputs=``,
per item: the batch axis is ketch's, up to ``max_batch_size``).
"""

from __future__ import annotations

from typing import Any

import ketch
from ketch import TensorSpec

VECTOR = (16,)


@ketch.model(
    name="simple",
    inputs=[TensorSpec("INPUT0", "int32", VECTOR), TensorSpec("INPUT1", "int32", VECTOR)],
    outputs=[TensorSpec("OUTPUT0", "int32", VECTOR), TensorSpec("OUTPUT1", "int32", VECTOR)],
    max_batch_size=8,
)
def simple(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sum and the difference of two vectors of 16 integers."""
    return [
        {
            "OUTPUT0": [a + b for a, b in zip(item["INPUT0"], item["INPUT1"], strict=True)],
            "OUTPUT1": [a - b for a, b in zip(item["INPUT0"], item["INPUT1"], strict=True)],
        }
        for item in items
    ]


@ketch.model(
    name="simple_int8",
    inputs=[TensorSpec("INPUT0", "int8", VECTOR), TensorSpec("INPUT1", "int8", VECTOR)],
    outputs=[TensorSpec("OUTPUT0", "int8", VECTOR), TensorSpec("OUTPUT1", "int8", VECTOR)],
    max_batch_size=8,
)
def simple_int8(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``simple`` on 8-bit integers."""
    return simple(items)


@ketch.model(
    name="simple_string",
    inputs=[TensorSpec("INPUT0", "str", VECTOR), TensorSpec("INPUT1", "str", VECTOR)],
    outputs=[TensorSpec("OUTPUT0", "str", VECTOR), TensorSpec("OUTPUT1", "str", VECTOR)],
    max_batch_size=8,
)
def simple_string(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``simple`` on integers written as text, answered as text."""
    answers = []
    for item in items:
        pairs = list(zip(map(int, item["INPUT0"]), map(int, item["INPUT1"]), strict=True))
        answers.append(
            {"OUTPUT0": [str(a + b) for a, b in pairs], "OUTPUT1": [str(a - b) for a, b in pairs]}
        )
    return answers


@ketch.model(
    name="simple_identity",
    inputs=[TensorSpec("INPUT0", "str", (-1,))],
    outputs=[TensorSpec("OUTPUT0", "str", (-1,))],
    max_batch_size=8,
)
def simple_identity(rows: list[list[str]]) -> list[list[str]]:
    """Its input, unchanged."""
    return rows


# -- sequences (Triton's sequence batcher): every request names its sequence ------------------

ONE = (1,)
SEQUENCE_TENSORS = {
    "inputs": [TensorSpec("INPUT", "int32", ONE)],
    "outputs": [TensorSpec("OUTPUT", "int32", ONE)],
}


@ketch.model(name="simple_sequence", sequence=True, max_batch_size=8, **SEQUENCE_TENSORS)
def simple_sequence(rows: list[list[int]], params: list[dict[str, Any]]) -> list[list[int]]:
    """Triton's ``simple_sequence``: a sequence's first value plus one, then each value."""
    return [
        [row[0] + 1 if p["sequence_start"] else row[0]] for row, p in zip(rows, params, strict=True)
    ]


@ketch.model(name="simple_dyna_sequence", sequence=True, max_batch_size=8, **SEQUENCE_TENSORS)
def simple_dyna_sequence(rows: list[list[int]], params: list[dict[str, Any]]) -> list[list[int]]:
    """``simple_sequence``, with the sequence's id added to its last answer."""
    answers = simple_sequence(rows, params)
    return [
        [answer[0] + int(p["sequence_id"]) if p["sequence_end"] else answer[0]]
        for answer, p in zip(answers, params, strict=True)
    ]


#: What ``simple_string_dyna_sequence`` has added up so far, per sequence. It lives in the
#: worker's process: ketch keeps every request of a sequence on the worker that has its sum.
_totals: dict[int | str, int] = {}


@ketch.model(
    name="simple_string_dyna_sequence", sequence=True, max_batch_size=8, **SEQUENCE_TENSORS
)
def simple_string_dyna_sequence(
    rows: list[list[int]], params: list[dict[str, Any]]
) -> list[list[int]]:
    """The running sum of a sequence's values, with its id (a number as text) added to the
    last answer; the sum is forgotten when the sequence ends."""
    answers = []
    for row, p in zip(rows, params, strict=True):
        sequence_id = p["sequence_id"]
        total = row[0] if p["sequence_start"] else _totals.get(sequence_id, 0) + row[0]
        _totals[sequence_id] = total
        if p["sequence_end"]:
            del _totals[sequence_id]
            total += int(sequence_id)
        answers.append([total])
    return answers
