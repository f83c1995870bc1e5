"""The OpenAPI document lists exactly the gateway's routes, and the server serves it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.routing import Route

from ketch.app_state import StateStore
from ketch.application import Applications
from ketch.dispatch import Dispatcher
from ketch.gateway import Gateway
from ketch.openapi import document
from tests.conftest import KetchServer

SERVABLE = Path(__file__).with_name("servable.py")


def routes_of_the_gateway(tmp_path: Path) -> set[tuple[str, str]]:
    gateway = Gateway(Dispatcher(lambda line: None), Applications(StateStore(tmp_path)), 60.0)
    served = set()
    for route in gateway.app().routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                served.add((route.path, method.lower()))
    return served


def test_every_route_is_in_the_document_and_nothing_else(tmp_path: Path) -> None:
    documented = {
        (path, method) for path, operations in document()["paths"].items() for method in operations
    }
    served = routes_of_the_gateway(tmp_path)
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented operations the gateway does not serve"
    assert ("/models/{name}/predict", "post") in served


def test_every_operation_documents_its_answers_and_every_reference_resolves() -> None:
    spec = document()
    schemas = spec["components"]["schemas"]
    text = repr(spec)
    for name in {part.split("'")[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in schemas, f"unresolved reference to {name}"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"], (path, method)
            assert "200" in operation["responses"], (path, method)
            parameters = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert parameters == {part[1:-1] for part in path.split("/") if part.startswith("{")}


def test_the_server_serves_the_document(start_server: Callable[..., KetchServer]) -> None:
    server = start_server(SERVABLE)
    response = server.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == document()
