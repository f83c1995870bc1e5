"""The ``/admin/deployments`` routes: code pushed with its environment (``ketch deploy``),
each deploy a version of its own (:mod:`ketch.deploys.deployer`).

``POST /admin/deployments`` takes the archive ``ketch deploy`` packs as the request body
(``application/gzip``), streamed to the store's ``uploads/`` folder within ``--max-deploy-mb``
(a ``Content-Length`` over it is refused before a byte is read) and within the read timeout
between two chunks. It answers 202 with the version the deploy will be, and the deploy goes
on in the background: ``GET .../versions/{version}`` shows its state and endpoints, ``.../log``
its build log. Only the admin token deploys (the ``/admin`` rule of :mod:`ketch.http.auth`),
and nothing of the store is ever served back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ketch.deploys.deployer import Deployer, DeployError, DeploymentStatus, DeployState
from ketch.http.admin import Admin
from ketch.http.admin_shapes import DeploymentRemoved, DeploymentsList, DeploymentVersions
from ketch.http.asgi import declared_length
from ketch.http.endpoints import Endpoints, json_response
from ketch.http.limits import MIB, linger
from ketch.serving.jobs import PredictionError

#: The one path whose body the route reads itself (see ``HttpLimits.streamed``).
UPLOAD_PATH = "/admin/deployments"
DEFAULT_MAX_DEPLOY_BYTES = 512 * MIB


class DeploymentRoutes:
    """The deploy routes over a server's deployer and its management API (which removes the
    models of a version the way ``DELETE /admin/models/...`` does).

    :param max_bytes: the largest archive, and the most its files may hold unpacked.
    :param idle_timeout_s: the longest the upload may pause between two chunks.
    """

    def __init__(
        self, deployer: Deployer, admin: Admin, max_bytes: int, idle_timeout_s: float
    ) -> None:
        self._deployer = deployer
        self._admin = admin
        self._max_bytes = max_bytes
        self._idle_timeout_s = idle_timeout_s

    def routes(self, endpoints: Endpoints) -> list[Route]:
        one = "/admin/deployments/{name}"
        version = one + "/versions/{version}"
        return [
            endpoints.route(UPLOAD_PATH, self.deploy, ["POST"], streamed=True),
            endpoints.route(UPLOAD_PATH, self.list_all, ["GET"]),
            endpoints.route(one, self.show_name, ["GET"]),
            endpoints.route(one, self.remove_name, ["DELETE"]),
            endpoints.route(version, self.show, ["GET"]),
            endpoints.route(version, self.remove, ["DELETE"]),
            endpoints.route(version + "/log", self.log, ["GET"]),
        ]

    async def deploy(self, request: Request) -> Response:
        declared = declared_length(request.scope)
        if declared is not None and declared > self._max_bytes:
            await linger(request.receive)  # so that the client reads the answer
            raise PredictionError(413, self._too_large(f"is {declared} bytes"))
        archive = self._deployer.store.new_upload().with_suffix(".tar.gz")
        try:
            await self._receive(request, archive)
            state = await self._deployer.accept(archive, self._max_bytes)
        except DeployError as exc:
            raise PredictionError(exc.status, str(exc)) from None
        finally:
            archive.unlink(missing_ok=True)
        return json_response(state.describe(), 202)  # answered before the build starts

    async def _receive(self, request: Request, archive: Any) -> None:
        received = 0
        with archive.open("wb") as out:
            chunks = request.stream().__aiter__()
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout_s):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise PredictionError(
                        408,
                        f"the upload paused for more than {self._idle_timeout_s:g} s "
                        f"after {received} bytes (ketch serve --read-timeout)",
                    ) from None
                except ClientDisconnect:
                    raise PredictionError(400, "the client went away during the upload") from None
                received += len(chunk)
                if received > self._max_bytes:
                    await linger(request.receive)
                    raise PredictionError(413, self._too_large("is larger"))
                out.write(chunk)
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
        if received == 0:
            raise PredictionError(
                400, "the request has no body: send the archive ketch deploy packs"
            )

    def _too_large(self, size: str) -> str:
        limit = self._max_bytes
        return (
            f"the archive {size}, more than this server takes: at most {limit} bytes "
            f"({limit / MIB:g} MiB, ketch serve --max-deploy-mb)"
        )

    async def list_all(self, request: Request) -> Response:
        states = [s for s in self._deployer.states() if s.state != "removed"]
        return json_response(DeploymentsList(deployments=_described(states)))

    async def show_name(self, request: Request) -> Response:
        states = self._found(lambda: self._deployer.versions_of(request.path_params["name"]))
        name = request.path_params["name"]
        return json_response(DeploymentVersions(name=name, versions=_described(states)))

    async def show(self, request: Request) -> Response:
        return json_response(self._state(request).describe(log_lines=20))

    async def log(self, request: Request) -> Response:
        """The build log; with ``?follow=1``, streamed on until the deploy is done (what
        ``ketch deploy --wait`` shows), ending with a line ``ketch: state STATE``."""
        state = self._state(request)
        if request.query_params.get("follow") not in ("1", "true"):
            return PlainTextResponse("".join(line + "\n" for line in state.log))

        async def lines() -> AsyncIterator[bytes]:
            async for line in state.follow():
                yield (line + "\n").encode()
            yield f"ketch: state {state.state}\n".encode()

        return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")

    async def remove(self, request: Request) -> Response:
        state = self._state(request)
        return json_response(await self._remove([state]))

    async def remove_name(self, request: Request) -> Response:
        states = self._found(lambda: self._deployer.versions_of(request.path_params["name"]))
        return json_response(await self._remove(states))

    async def _remove(self, states: list[DeployState]) -> DeploymentRemoved:
        """Remove the models of ``states`` (refused, 409, while a version answers requests
        without a version and others remain, or is linked to an application), then forget
        the deploys."""
        busy = [s for s in states if not s.done.is_set()]
        if busy:
            raise PredictionError(
                409, f"{busy[0].name} version {busy[0].version} is still deploying; wait for it"
            )
        served = [
            spec
            for state in states
            if state.state == "ready"
            for spec in state.models
            if self._admin.serves(spec.key)
        ]
        going: dict[str, frozenset[str]] = {}
        for spec in served:
            going[spec.name] = going.get(spec.name, frozenset()) | {spec.version}
        # All checked before any is removed: a version that must stay keeps the whole deploy.
        for spec in served:
            self._admin.check_removable(spec.name, spec.version, going[spec.name])
        removed: list[str] = []
        for spec in served:
            answer = await self._admin.remove_versions(spec.name, spec.version, going[spec.name])
            removed += answer["removed"]
        for state in states:
            self._deployer.forget(state)
        return DeploymentRemoved(removed=[f"{s.name}:{s.version}" for s in states], models=removed)

    def _state(self, request: Request) -> DeployState:
        name, version = request.path_params["name"], request.path_params["version"]
        if not version.isdigit():
            raise PredictionError(
                404, f"no deployment {name!r} version {version!r}: versions are 1, 2, ..."
            )
        state: DeployState = self._found(lambda: self._deployer.state_of(name, int(version)))
        return state

    @staticmethod
    def _found(find: Any) -> Any:
        try:
            return find()
        except DeployError as exc:
            raise PredictionError(exc.status, str(exc)) from None


def _described(states: list[DeployState]) -> list[DeploymentStatus]:
    return [state.describe() for state in states]
