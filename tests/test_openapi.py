"""The OpenAPI document lists exactly the gateway's routes, and the server serves it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from starlette.routing import Route

from ketch.applications.catalog import Applications
from ketch.applications.state import FileStateStore
from ketch.deploys.deployer import Deployer
from ketch.deploys.store import Store
from ketch.http.admin import Admin
from ketch.http.admin_changes import Changes
from ketch.http.auth import Tokens
from ketch.http.deployments import DeploymentRoutes
from ketch.http.openapi import document
from ketch.http.repository import Repository
from ketch.http.routes import Gateway
from ketch.inference.shared_memory import SharedMemory
from ketch.plugin_manager import load_plugins
from ketch.pools.envs import Environments
from ketch.pools.scaling import PoolManager
from ketch.pools.supervisor import ProcessEvents, WorkerProcesses
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.zmq_transport.liveness import Heartbeat
from tests.conftest import KetchServer

SERVABLE = Path(__file__).with_name("servable.py")
_NO_EVENTS = ProcessEvents(*(lambda *_: None for _ in range(6)))


def routes_of_the_gateway(tmp_path: Path) -> set[tuple[str, str]]:
    dispatcher = Dispatcher(lambda event: None)
    plugins = load_plugins()
    apps = Applications(FileStateStore(tmp_path), plugins, dispatcher, Deadlines(60.0))
    workers = WorkerProcesses("", "tcp://127.0.0.1:0", Heartbeat(), _NO_EVENTS, plugins)
    pools = PoolManager(dispatcher, workers)
    changes = Changes()
    admin = Admin(dispatcher, pools, apps, changes, plugins, lambda event: None, 60.0)
    store = Store(tmp_path / "store")
    deployer = Deployer(
        store, Environments(store.envs), plugins, pools, dispatcher, lambda event: None
    )
    deployments = DeploymentRoutes(deployer, admin, 2**20, 30.0)
    repository = Repository(dispatcher, admin, changes, "none")
    gateway = Gateway(
        dispatcher, apps, Deadlines(60.0), admin, deployments, Tokens(), repository, SharedMemory()
    )
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
            successes = [status for status in operation["responses"] if status.startswith("2")]
            assert len(successes) == 1, (path, method, successes)
            parameters = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert parameters == set(re.findall(r"\{(\w+)\}", path))  # /v1/models/{name}:predict


def test_adding_answers_201_a_deploy_202_and_everything_else_200() -> None:
    created = {("/admin/models", "post"), ("/admin/apps", "post"), ("/admin/pipelines", "post")}
    accepted = {("/admin/deployments", "post")}  # the build goes on after the answer
    for path, operations in document()["paths"].items():
        for method, operation in operations.items():
            expected = "201" if (path, method) in created else "200"
            expected = "202" if (path, method) in accepted else expected
            assert expected in operation["responses"], (path, method)


def test_the_security_of_each_operation_is_the_token_its_route_needs() -> None:
    spec = document()
    schemes = spec["components"]["securitySchemes"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            security = operation["security"]
            assert all(name in schemes for requirement in security for name in requirement)
            if path.startswith("/admin/"):
                assert security == [{"bearer": []}], (path, method)
            elif path in {"/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"}:
                assert security == [], (path, method)
                assert "401" not in operation["responses"], (path, method)
                continue
            else:  # open unless the server has a predict token
                assert {} in security and {"bearer": []} in security, (path, method)
            assert "WWW-Authenticate" in operation["responses"]["401"]["headers"], (path, method)


def test_the_server_serves_the_document(start_server: Callable[..., KetchServer]) -> None:
    server = start_server(SERVABLE)
    response = server.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == document()
