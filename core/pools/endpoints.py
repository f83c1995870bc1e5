"""Broker endpoints as other machines dial them: the one rule that Ray placement and the
gateways of one cluster share."""

from __future__ import annotations

from collections.abc import Callable

#: Hosts a broker binds to that no other machine can dial as they are.
WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def dialable(endpoint: str, address: Callable[[], str]) -> str:
    """``endpoint`` as another machine dials it: a wildcard host becomes ``address()`` (this
    machine's address where the others are, asked for only then); any other host as it is."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if host not in WILDCARD_HOSTS:
        return endpoint
    return f"tcp://{address()}:{port}"
