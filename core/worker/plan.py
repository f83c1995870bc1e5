"""``WorkerPlan``: everything a worker process needs to start, as plain data.

The gateway's supervisor writes one per worker (:mod:`ketch.pools.supervisor`), ``ketch worker``
writes one for a hand-started worker, and the worker reads it in whatever process it runs:
forked, or another interpreter that reads it as JSON on its standard input (never on its
command line, which other users can read: the plan holds the worker's secret key).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ketch.zmq_transport import worker
from ketch.zmq_transport.liveness import Heartbeat
from ketch.zmq_transport.security import WorkerKeys


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything a worker needs to start; plain data, so it crosses into other interpreters.

    :param target: ``FILE_OR_MODULE:name`` of the model: the ``python`` runtime's artifact
        when the model is a decorated function.
    :param version: its version (None: the only or highest one).
    :param broker: the broker endpoint to join.
    :param heartbeat_interval_s, heartbeat_liveness: heartbeat settings, as the broker's.
    :param resources: the model's limits when the starter knows them, applied before the
        model's module is imported so its libraries load with them.
    :param managed: started by ``ketch serve``, which replaces it when it dies (it exits when
        the broker goes away and ignores Ctrl-C); a hand-started worker rejoins instead.
    :param deployment: a deployed model's spec (as a dict): its runtime loads its artifact,
        and ``target`` is not imported.
    :param plugins: the modules and files the gateway loaded as plugins (``--plugin``), which
        the worker loads too, to find its runtime.
    :param autoload: whether the worker loads the installed plugins (entry points), as the
        gateway did.
    :param broker_keys: the broker's public key and this worker's CURVE pair
        (:meth:`WorkerKeys.to_dict`); None for a broker started with ``--insecure-broker``.
        A secret, so a plan never travels on a command line.
    :param launch: the id the supervisor gave this process, which its READY announces.
    :param node: the Ray node it was placed on (set there, by the launcher).
    """

    target: str
    version: str | None
    broker: str
    heartbeat_interval_s: float = Heartbeat().interval_s
    heartbeat_liveness: int = Heartbeat().liveness
    resources: dict[str, Any] | None = None
    managed: bool = True
    deployment: dict[str, Any] | None = None
    plugins: tuple[str, ...] = ()
    autoload: bool = True
    broker_keys: dict[str, str] | None = field(default=None, repr=False)
    launch: str | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        # From JSON, a list.
        object.__setattr__(self, "plugins", tuple(self.plugins))

    def options(self) -> worker.WorkerOptions:
        heartbeat = Heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        keys = WorkerKeys.from_dict(self.broker_keys) if self.broker_keys is not None else None
        return worker.WorkerOptions(
            self.broker,
            heartbeat,
            rejoin=not self.managed,
            keys=keys,
            launch=self.launch,
            node=self.node,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerPlan:
        """Rebuild a plan from :meth:`to_dict`, ignoring keys a newer gateway may add."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        data: Mapping[str, Any] = json.loads(text)
        return cls.from_dict(data)
