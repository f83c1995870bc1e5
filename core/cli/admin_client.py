"""``ketch models ...`` and ``ketch apps ...``: the management API (:mod:`ketch.http.admin`) of a
running server, one operation per method, each returning the server's JSON answer and a line
saying what happened."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ketch.cli.http_client import READ_TIMEOUT_S, request_json
from ketch.cli.status import apps_table, models_table
from ketch.errors import KetchError


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an operation did: ``answer`` as the server sent it (``--json`` prints it),
    ``text`` for people (a line, or a table for a list)."""

    answer: Any
    text: str


class AdminClient:
    """The ``/admin`` routes of the server at ``url``, with the admin ``token``."""

    def __init__(self, url: str, token: str | None) -> None:
        self._url = url
        self._token = token

    # -- models -----------------------------------------------------------------------------

    def list_models(self) -> Outcome:
        answer = self._read("/admin/models")
        return Outcome(answer, models_table(answer["models"]))

    def add_model(
        self,
        name: str,
        runtime: str,
        path: str,
        version: str | None,
        settings: Mapping[str, Any],
        wait: bool,
    ) -> Outcome:
        """Serve model ``name`` from ``path`` through ``runtime``; a version of a model
        already served takes no traffic until it is rolled to."""
        body: dict[str, Any] = {
            "name": name,
            "runtime": runtime,
            "path": path,
            "settings": dict(settings),
            "wait": wait,
        }
        if version is not None:
            body["version"] = version
        answer = self._change("POST", "/admin/models", body)
        model = answer["model"]
        if model["default"]:
            serves = "it answers requests without a version"
        else:
            serves = f"requests without a version still go to {answer['default_version']}"
        return Outcome(answer, f"model {_label(model)} added (state {model['state']}); {serves}")

    def remove_model(self, name: str, version: str | None) -> Outcome:
        """Stop serving a version of model ``name`` (None: every version), once the requests
        queued on it are answered."""
        answer = self._change("DELETE", _model_path(name, version))
        default = answer.get("default")
        after = (
            f"requests without a version go to {default}"
            if default is not None
            else f"model {name} is no longer served"
        )
        text = f"removed {', '.join(answer['removed'])}; {after}"
        unfinished = answer.get("unfinished_requests") or 0
        if unfinished:
            text += f"; {unfinished} queued requests had no answer when its workers stopped"
        return Outcome(answer, text)

    def scale(self, name: str, version: str | None, pool: Mapping[str, Any]) -> Outcome:
        """Change the pool of a version of model ``name`` (None: the default version) with
        the :class:`ketch.specs.models.PoolSpec` fields in ``pool``."""
        answer = self._change("PATCH", _model_path(name, version) + "/pool", dict(pool))
        model = answer["model"]
        bounds = model["pool"]
        return Outcome(
            answer,
            f"model {_label(model)} pool: {bounds['min_replicas']}-{bounds['max_replicas']} "
            f"replicas, idle timeout {bounds['idle_timeout_s']:g} s, "
            f"{bounds['target_inflight']} requests in flight per worker, "
            f"cold start timeout {bounds['cold_start_timeout_s']:g} s",
        )

    def apply_plan(self, path: Path) -> Outcome:
        """Serve the models the plan at ``path`` sizes as it plans them."""
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KetchError(f"cannot read the plan {path}: {exc}") from None
        answer = self._change("POST", "/admin/plan", plan)
        lines = [
            f"model {_label(model)} planned: batches of up to {model['max_batch_size']}, "
            f"{model['batching']['max_delay_ms']:g} ms delay, "
            f"{model['pool']['min_replicas']}-{model['pool']['max_replicas']} replicas, "
            f"{model['resources']['threads']} threads"
            for model in answer["models"]
        ]
        return Outcome(answer, "\n".join(lines))

    def roll(self, name: str, version: str, timeout_s: float | None) -> Outcome:
        """Send requests without a version to ``version``, once it has a ready worker."""
        body: dict[str, Any] = {"version": version}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        answer = self._change("POST", _model_path(name, None) + "/roll", body)
        default, previous = answer["default"], answer["previous"]
        if default == previous:
            text = f"model {name}: requests without a version already go to {default}"
        else:
            text = f"model {name}: requests without a version go to {default} (was {previous})"
        return Outcome(answer, text)

    # -- applications -----------------------------------------------------------------------

    def list_apps(self) -> Outcome:
        answer = self._read("/admin/apps")
        return Outcome(answer, apps_table(answer["apps"]))

    def add_app(self, name: str, models: Sequence[str], spec: Mapping[str, Any]) -> Outcome:
        """Serve application ``name`` over ``models``; ``spec`` has any other fields of
        ``POST /admin/apps`` (``policy``, ``params``, ``slo_ms``, ``default_output``)."""
        body = {**spec, "name": name, "models": list(models)}
        answer = self._change("POST", "/admin/apps", body)
        app = answer["app"]
        return Outcome(answer, f"app {name} added: {_policy_over_models(app)}")

    def remove_app(self, name: str) -> Outcome:
        answer = self._change("DELETE", _app_path(name))
        return Outcome(answer, f"app {name} removed")

    def change_app(self, name: str, changes: Mapping[str, Any]) -> Outcome:
        """Change the fields of application ``name`` in ``changes`` (``params`` replaces
        every param)."""
        answer = self._change("PATCH", _app_path(name), dict(changes))
        return Outcome(answer, _app_changed(name, "changed", answer))

    def link(self, name: str, model: str, position: int | None) -> Outcome:
        """Add ``model`` to the models of application ``name``, at ``position`` (None:
        last)."""
        body: dict[str, Any] = {"model": model}
        if position is not None:
            body["position"] = position
        answer = self._change("POST", _app_path(name) + "/models", body)
        return Outcome(answer, _app_changed(name, f"linked {model}", answer))

    def unlink(self, name: str, model: str) -> Outcome:
        answer = self._change("DELETE", f"{_app_path(name)}/models/{_quoted(model)}")
        return Outcome(answer, _app_changed(name, f"unlinked {model}", answer))

    # -- requests ---------------------------------------------------------------------------

    def _read(self, path: str) -> Any:
        return request_json(self._url, "GET", path, token=self._token, timeout_s=READ_TIMEOUT_S)

    def _change(self, method: str, path: str, body: Any = None) -> Any:
        # No client deadline: the server bounds every change itself (a cold start, the
        # requests a removed model must answer first, its turn behind another change), and
        # giving up sooner would report a failure for a change that then happens anyway.
        return request_json(self._url, method, path, body, self._token, timeout_s=None)


def _quoted(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _model_path(name: str, version: str | None) -> str:
    path = f"/admin/models/{_quoted(name)}"
    return path if version is None else f"{path}/versions/{_quoted(version)}"


def _app_path(name: str) -> str:
    return f"/admin/apps/{_quoted(name)}"


def _label(model: Mapping[str, Any]) -> str:
    return f"{model['name']}:{model['version']}"


def _policy_over_models(app: Mapping[str, Any]) -> str:
    return f"policy {app['policy']} over {', '.join(app['models'])}"


def _app_changed(name: str, what: str, answer: Mapping[str, Any]) -> str:
    state = (
        "its policy keeps what it learnt"
        if answer["state"] == "kept"
        else f"its policy starts afresh: {answer['reset_because']}"
    )
    return f"app {name} {what}: {_policy_over_models(answer['app'])}; {state}"
