"""One keep-alive HTTP/1.1 connection for timing single requests: a blocking socket, request
bytes built once by loadgen, and loadgen's minimal response parser (``http.client`` would add
about 0.3 ms to every request, a fifth of a warm one)."""

from __future__ import annotations

import socket

from loadgen import LoadSpec, _build_target, _parse_head


class KeepAliveConnection:
    """POSTs to one URL on one connection; callers time :meth:`exchange` themselves."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        target = _build_target(LoadSpec(url=url, body=b"{}"))
        self._address = (target.host, target.port)
        self._timeout_s = timeout_s
        self._buffer = bytearray()
        self._socket = self._connect()

    def _connect(self) -> socket.socket:
        connection = socket.create_connection(self._address, self._timeout_s)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def request_bytes(self, body: bytes) -> bytes:
        """The whole request that POSTs ``body`` (JSON), to send with :meth:`exchange`."""
        return _build_target(LoadSpec(url=self.url, body=body)).request

    def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send ``request`` and read its answer: the status, the body, and whether the server
        closes the connection after it."""
        self._socket.sendall(request)
        buffer = self._buffer
        while (head_end := buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        status, length, closes = _parse_head(bytes(buffer[:head_end]))
        end = head_end + 4 + length
        while len(buffer) < end:
            self._receive()
        body = bytes(buffer[head_end + 4 : end])
        del buffer[:end]
        return status, body, closes

    def reconnect(self) -> None:
        """A new connection, after the server said it closes this one."""
        self._socket.close()
        self._buffer.clear()
        self._socket = self._connect()

    def _receive(self) -> None:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk

    def close(self) -> None:
        self._socket.close()
