"""Bounded HTTP (``ketch.http.limits``, ``ketch.http.draining``): bodies too large, too slow
or too deep, answers JSON cannot carry, and a graceful stop, against real `ketch serve`
processes over real sockets on loopback."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KetchServer

StartServer = Callable[..., KetchServer]
WriteModels = Callable[..., Path]

MODELS = """
import math
import sys
import time

import ketch

@ketch.model
def echo(xs):
    return xs

@ketch.model
def overflow(xs):
    return [1e308 * 2 for x in xs]

@ketch.model
def scores(xs):
    return [{"label": "cat", "score": math.nan} for x in xs]

overflowing = ketch.app("overflowing", models=["overflow"])

@ketch.model(max_batch_size=1)
def quick(xs):
    print(f"quick started {xs[0]}", file=sys.stderr, flush=True)
    time.sleep(2)  # the model's compute time: still in flight when the server is stopped
    return xs

@ketch.model(max_batch_size=1)
def stuck(xs):
    print(f"stuck started {xs[0]}", file=sys.stderr, flush=True)
    time.sleep(600)  # a request the grace period cannot wait for
    return xs
"""

#: How long a socket read waits for the server: a deadline, never what a test measures.
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    """One server with small limits (1 MiB bodies, a 1 s read timeout) for the tests that
    leave it serving."""
    folder = tmp_path_factory.mktemp("limits")
    models = folder / "models.py"
    models.write_text(MODELS)
    served = KetchServer(
        models, "--max-body-mb", "1", "--read-timeout", "1", "--state-dir", str(folder / "state")
    )
    try:
        yield served.wait_ready()
    finally:
        served.stop()


def connect(server: KetchServer) -> socket.socket:
    url = httpx.URL(server.url)
    assert url.host and url.port
    sock = socket.create_connection((url.host, url.port), timeout=DEADLINE_S)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """The status, headers and JSON body of the one answer the server sends, read until it
    closes the connection."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


def still_serves(server: KetchServer) -> None:
    assert server.predict("echo", {"input": 7}).json()["output"] == 7


# -- body size ------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    server: KetchServer,
) -> None:
    with connect(server) as sock:
        # 100 MiB announced, 16 bytes sent: the answer cannot have waited for the rest.
        sock.sendall(
            b"POST /models/echo/predict HTTP/1.1\r\nHost: ketch\r\n"
            b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
            b'{"input": "xxxx'
        )
        status, headers, body = read_answer(sock)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert body["max_body_bytes"] == 2**20
    assert "104857600 bytes" in body["error"] and "--max-body-mb" in body["error"]
    still_serves(server)


def test_a_client_that_sends_the_whole_large_body_reads_the_413(server: KetchServer) -> None:
    response = server.client.post(
        "/models/echo/predict", content=b'{"input": "' + b"x" * 3 * 2**20 + b'"}'
    )
    assert response.status_code == 413
    assert "at most 1048576 bytes (1 MiB" in response.json()["error"]
    still_serves(server)


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server: KetchServer) -> None:
    chunk = b"x" * 65536
    with connect(server) as sock:
        sock.sendall(
            b"POST /models/echo/predict HTTP/1.1\r\nHost: ketch\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        # 1.25 MiB of chunks and no last chunk: the body never ends, yet it is answered.
        for _ in range(20):
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break  # it answered and closed while the rest was on its way, as it should
        status, headers, body = read_answer(sock)
    assert status == 413
    assert headers["connection"] == "close"
    assert body == {
        "error": "the request body is larger than this server takes: at most 1048576 bytes "
        "(1 MiB, ketch serve --max-body-mb)",
        "max_body_bytes": 1048576,
    }
    still_serves(server)


def test_over_http2_a_large_body_is_refused_and_the_connection_serves_on(
    server: KetchServer,
) -> None:
    def chunks() -> Iterator[bytes]:  # no length: HTTP/2 says where the body ends
        for _ in range(20):
            yield b"x" * 65536

    with httpx.Client(base_url=server.url, http1=False, http2=True) as client:
        refused = client.post("/models/echo/predict", content=chunks())
        assert (refused.http_version, refused.status_code) == ("HTTP/2", 413)
        assert refused.json()["max_body_bytes"] == 2**20
        served = client.post("/models/echo/predict", json={"input": 3})
        assert served.json()["output"] == 3


def test_a_body_within_the_limit_is_served_chunked_too(server: KetchServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"input": "'
        yield b"y" * 500_000
        yield b'"}'

    response = server.client.post("/models/echo/predict", content=chunks())
    assert response.status_code == 200
    assert response.json()["output"] == "y" * 500_000


# -- slow requests --------------------------------------------------------------------------


def test_a_body_that_trickles_is_answered_408_at_the_read_timeout(server: KetchServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"POST /models/echo/predict HTTP/1.1\r\nHost: ketch\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        stop = threading.Event()

        def trickle() -> None:
            # A byte now and then, each well within the timeout: the whole body's deadline
            # is what ends it. The client's pace, not a wait for the server.
            while not stop.wait(0.2):
                try:
                    sock.sendall(b" ")
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            status, headers, body = read_answer(sock)
        finally:
            stop.set()
            sender.join(DEADLINE_S)
    assert status == 408
    assert headers["connection"] == "close"
    assert body["timeout_s"] == 1.0
    assert "did not arrive within 1 s (ketch serve --read-timeout)" in body["error"]
    still_serves(server)


def test_headers_that_never_end_have_their_connection_closed(server: KetchServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /models/echo/predict HTTP/1.1\r\nHost: ketch\r\nX-Slow: ")
        # Hypercorn closes it at the read timeout, with no answer: there is no request yet.
        assert sock.recv(65536) == b""
    still_serves(server)


def test_headers_larger_than_16_kib_are_refused(server: KetchServer) -> None:
    # Whole in one read, and longer than Hypercorn's buffer of headers that have not ended.
    for size in (20_000, 100_000):
        response = server.client.get("/v2/health/live", headers={"X-Big": "z" * size})
        assert response.status_code == 431, size
        if size < 65536:
            assert response.json()["max_header_bytes"] == 16384
    still_serves(server)


# -- deep bodies ----------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def test_a_body_600_levels_deep_is_a_400_naming_the_depth(server: KetchServer) -> None:
    for path, body in [
        ("/models/echo/predict", '{"input": ' + nested(600) + "}"),
        ("/apps/overflowing/predict", '{"input": ' + nested(600) + "}"),
        (
            "/v2/models/echo/infer",
            '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": '
            + nested(600)
            + "}]}",
        ),
    ]:
        response = server.client.post(path, content=body)
        assert response.status_code == 400, (path, response.text)
        assert response.json() == {
            "error": "request body nests arrays and objects more than 64 levels deep; no "
            "model input needs that many"
        }
    still_serves(server)


def test_a_body_within_the_depth_is_served(server: KetchServer) -> None:
    # 64 levels with the body's own object; brackets inside strings are not nesting.
    response = server.client.post(
        "/models/echo/predict", content='{"input": [' + nested(62) + ', "' + "[" * 600 + '"]}'
    )
    assert response.status_code == 200
    assert response.json()["output"][1] == "[" * 600


def test_numbers_beyond_what_the_field_holds_are_a_400(server: KetchServer) -> None:
    for path, body, error in [
        (
            "/models/echo/predict",
            '{"inputs": [1e400]}',
            "'inputs[0]' is a number out of range: more than a 64-bit number holds",
        ),
        (
            "/models/echo/predict",
            '{"input": 1, "timeout_ms": -1e400}',
            "'timeout_ms' is a number out of range: more than a 64-bit number holds",
        ),
        (
            "/v2/models/echo/infer",
            '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e300]}]}',
            "input 'x': data has values outside the range of FP32",
        ),
    ]:
        response = server.client.post(path, content=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"] == error


# -- answers JSON cannot carry --------------------------------------------------------------


def test_an_infinite_output_is_a_500_naming_the_model_and_the_output(
    server: KetchServer,
) -> None:
    response = server.predict("overflow", {"inputs": [1, 2]})
    assert response.status_code == 500
    assert response.json() == {
        "error": "model 'overflow:1' answered Infinity at 'outputs[0]', which JSON cannot "
        "carry: the answer is refused rather than sent with null there",
        "model": "overflow",
        "version": "1",
    }


def test_a_nan_deep_in_an_output_is_named_by_its_path(server: KetchServer) -> None:
    response = server.predict("scores", {"input": 1})
    assert response.status_code == 500
    assert "model 'scores:1' answered NaN at 'output.score'" in response.json()["error"]


def test_an_infinite_tensor_is_a_500_on_the_open_inference_protocol(
    server: KetchServer,
) -> None:
    response = server.client.post(
        "/v2/models/overflow/infer",
        json={"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 2]}]},
    )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error.startswith("output 'output_0' of model 'overflow:1' holds Infinity at [0]")


def test_an_application_answering_infinity_is_a_500_naming_it(server: KetchServer) -> None:
    response = server.client.post("/apps/overflowing/predict", json={"input": 1})
    assert response.status_code == 500
    body = response.json()
    assert body["app"] == "overflowing"
    assert body["error"].startswith("application 'overflowing' answered Infinity at 'output'")


# -- graceful stop --------------------------------------------------------------------------


def test_sigterm_lets_requests_in_grace_finish_and_answers_the_rest_503(
    start_server: StartServer, write_models: WriteModels
) -> None:
    server = start_server(
        write_models(MODELS),
        "--workers-per-model",
        "1",
        "--shutdown-grace",
        "6",
        "--log-level",
        "INFO",
    )
    kept_alive = httpx.Client(
        base_url=server.url,
        timeout=DEADLINE_S,
        limits=httpx.Limits(keepalive_expiry=DEADLINE_S * 2),  # not given up before the stop
    )
    assert kept_alive.get("/v2/health/live").status_code == 200  # its connection stays open
    answers: dict[str, httpx.Response] = {}

    def ask(model: str) -> None:
        with httpx.Client(base_url=server.url, timeout=DEADLINE_S * 2) as client:
            answers[model] = client.post(f"/models/{model}/predict", json={"input": 1})

    askers = [threading.Thread(target=ask, args=(model,)) for model in ("quick", "stuck")]
    for asker in askers:
        asker.start()
    server.wait_for_stderr(r"quick started 1")
    server.wait_for_stderr(r"stuck started 1")

    server.process.send_signal(signal.SIGTERM)
    server.wait_for_stderr(r"stopping: no new connections; 2 requests in flight have 6 s")
    # A request on a connection opened before: answered, 503; a new connection: refused.
    refused = kept_alive.get("/v2/health/live")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["error"]
    url = httpx.URL(server.url)
    assert url.host and url.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((url.host, url.port), timeout=DEADLINE_S)

    for asker in askers:
        asker.join(DEADLINE_S * 2)
    assert answers["quick"].status_code == 200, answers["quick"].text
    assert answers["quick"].json()["output"] == 1
    cut_off = answers["stuck"]
    assert cut_off.status_code == 503
    assert cut_off.headers["content-type"] == "application/json"
    assert cut_off.headers["retry-after"] == "1"
    assert "shutting down" in cut_off.json()["error"]
    server.wait_for_stderr(r"1 requests still in flight after the 6 s grace were answered 503")
    server.wait_for(r"^ketch: stopped$")
    assert server.process.wait(DEADLINE_S) == 0
    kept_alive.close()


def test_a_second_signal_ends_the_grace_at_once(
    start_server: StartServer, write_models: WriteModels
) -> None:
    server = start_server(
        write_models(MODELS),
        "--workers-per-model",
        "1",
        "--shutdown-grace",
        "600",
        "--log-level",
        "INFO",
    )
    answers: list[httpx.Response] = []

    def ask() -> None:
        with httpx.Client(base_url=server.url, timeout=DEADLINE_S * 2) as client:
            answers.append(client.post("/models/stuck/predict", json={"input": 2}))

    asker = threading.Thread(target=ask)
    asker.start()
    server.wait_for_stderr(r"stuck started 2")
    server.process.send_signal(signal.SIGINT)
    # Once the first is handled: two signals sent at once may reach the process as one.
    server.wait_for_stderr(r"stopping: no new connections; 1 requests in flight have 600 s")
    server.process.send_signal(signal.SIGINT)
    asker.join(DEADLINE_S * 2)
    assert [a.status_code for a in answers] == [503]
    server.wait_for(r"^ketch: stopped$")
    assert server.process.wait(DEADLINE_S) == 0
