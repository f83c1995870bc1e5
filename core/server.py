"""``ketch serve``: discovery, broker, local workers and the HTTP gateway in one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

import msgspec

from ketch.applications.catalog import Applications, build_applications
from ketch.applications.state import (
    FileStateStore,
    SharedStateError,
    StateStore,
    default_state_dir,
)
from ketch.deploys.deployer import Deployer
from ketch.deploys.store import Store
from ketch.errors import TargetLoadError
from ketch.grpc.server import DEFAULT_GRPC_PORT, GrpcServer
from ketch.grpc.service import InferenceService
from ketch.http.admin import Admin
from ketch.http.admin_changes import Changes
from ketch.http.auth import TokenGuard, Tokens
from ketch.http.deployments import DEFAULT_MAX_DEPLOY_BYTES, UPLOAD_PATH, DeploymentRoutes
from ketch.http.limits import HttpLimits
from ketch.http.repository import ModelControl, Repository
from ketch.http.routes import Gateway
from ketch.http.server import bind_tcp, serve_asgi
from ketch.inference.shared_memory import SharedMemory
from ketch.observability import events
from ketch.planning.applied import apply_plan
from ketch.plugin_manager import Plugins, load_plugins
from ketch.pools.cgroups import MemoryCgroups
from ketch.pools.discovery import Served, discover_served
from ketch.pools.envs import Environments
from ketch.pools.ray_placement import RayPlacement
from ketch.pools.scaling import PoolManager
from ketch.pools.supervisor import ProcessEvents, WorkerProcesses
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.specs.deployments import parse_model_argument
from ketch.specs.models import ModelSpec
from ketch.zmq_transport.broker import DEFAULT_MAX_MESSAGE_BYTES, Broker
from ketch.zmq_transport.liveness import Heartbeat
from ketch.zmq_transport.security import BrokerKeys

if TYPE_CHECKING:
    from ketch.applications.shared import SharedState
    from ketch.http.shared_changes import SharedChanges
    from ketch.pools.gateways import Gateways

log = logging.getLogger("ketch.server")
#: Where an environment's build output goes while ``ketch serve`` starts.

DEFAULT_BROKER = "tcp://127.0.0.1:7070"


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Everything ``ketch serve`` takes.

    :param source: the file (``app.py``) or module (``pkg.models``) that defines the models
        and applications; None when every model comes from ``models``.
    :param models: saved models to serve as well, each ``NAME=RUNTIME:PATH``
        (``ketch serve --model``).
    :param host: interface the HTTP gateway listens on.
    :param port: HTTP port; 0 picks a free one (printed at start).
    :param broker: ZeroMQ endpoint workers connect to; ``tcp://0.0.0.0:7070`` admits workers
        from other machines, ``tcp://127.0.0.1:*`` picks a free port.
    :param workers_per_model: workers kept warm for each model version at least (raises each
        model's ``min_replicas``; 0 leaves the pools as the models declare them).
    :param plan: a plan ``ketch plan`` wrote, applied to the models it names
        (:mod:`ketch.planning.applied`).
    :param heartbeat: heartbeat interval and liveness between broker and workers.
    :param request_timeout_s: longest a request waits for its answer before a 504.
    :param plugins: modules or files to load as plugins, besides the installed ones.
    :param state_dir: where applications keep their policies' state across restarts
        (``None``: ``$KETCH_STATE_DIR``, else ``~/.local/state/ketch``).
    :param state: a Redis URL where applications keep their policy state, answered queries
        and feedback instead, shared with every gateway given the same one
        (:mod:`ketch.applications.shared`).
    :param store_dir: the model store: deployed code, environments, records
        (``None``: ``STATE_DIR/store``), see :mod:`ketch.deploys.store`.
    :param max_deploy_bytes: the largest deploy archive (and the most it may unpack to).
    :param log_format: ``text`` prints status as ``ketch: ...`` lines, ``json`` as one JSON
        object per line (see :mod:`ketch.observability.events`).
    :param admin_token: the bearer token of the management API (``/admin``); None turns it off.
    :param predict_token: the bearer token every other route but the health probes,
        ``/metrics`` and ``/openapi.json`` needs; None leaves them open.
    :param broker_keys: a folder :func:`~ketch.zmq_transport.security.keygen` wrote: the
        broker's pair and ``authorized/`` worker keys; None makes a pair at start, so only the
        workers this server starts can join.
    :param insecure_broker: turn CURVE off: any peer that reaches the broker is a worker.
    :param allow_worker_models: let a worker started by hand add a model version this server
        does not serve (by default its READY is refused).
    :param broker_max_message_bytes: the largest frame a worker may send the broker.
    :param http: how large and slow a request may be, and the grace period of a graceful
        stop (``--max-body-mb``, ``--read-timeout``, ``--shutdown-grace``).
    :param grpc_port: the port of the Open Inference Protocol over gRPC, on ``host``
        (Triton's 8001 by default; 0 picks a free one; None turns gRPC off).
    :param model_control: ``explicit`` lets clients load and unload models through Triton's
        model repository extension; ``none`` refuses it (:mod:`ketch.http.repository`).
    :param reuse_port: share the HTTP and gRPC ports with the other gateway processes of
        ``ketch serve --gateways N`` (``SO_REUSEPORT``; :mod:`ketch.cli.gateways`).
    :param placement: ``local`` starts workers as processes of this machine; ``ray`` asks the
        Ray cluster at ``ray_address`` to place each (:mod:`ketch.pools.ray_placement`).
    """

    source: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    broker: str = DEFAULT_BROKER
    workers_per_model: int = 0
    plan: Path | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    request_timeout_s: float = 60.0
    plugins: tuple[str, ...] = ()
    state_dir: Path | None = None
    state: str | None = None
    store_dir: Path | None = None
    max_deploy_bytes: int = DEFAULT_MAX_DEPLOY_BYTES
    models: tuple[str, ...] = ()
    log_format: events.LogFormat = "text"
    admin_token: str | None = field(default=None, repr=False)
    predict_token: str | None = field(default=None, repr=False)
    broker_keys: Path | None = None
    insecure_broker: bool = False
    allow_worker_models: bool = False
    broker_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    http: HttpLimits = field(default_factory=HttpLimits)
    grpc_port: int | None = DEFAULT_GRPC_PORT
    model_control: ModelControl = "none"
    placement: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.workers_per_model < 0:
            raise ValueError(f"workers per model must be >= 0, got {self.workers_per_model}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request timeout must be > 0 s, got {self.request_timeout_s}")
        Tokens(self.admin_token, self.predict_token)  # refuses an empty or padded token
        if self.max_deploy_bytes < 1:
            raise ValueError(f"the deploy size limit must be > 0, got {self.max_deploy_bytes}")
        if self.broker_max_message_bytes < 1:
            raise ValueError(
                f"the broker's message limit must be > 0, got {self.broker_max_message_bytes}"
            )
        if self.insecure_broker and self.broker_keys is not None:
            raise ValueError("--broker-keys and --insecure-broker contradict each other")
        if self.placement == "ray" and not self.broker.startswith("tcp://"):
            raise ValueError(
                f"--placement ray needs a --broker on tcp that the nodes reach, not {self.broker}"
            )
        if self.state is not None and not self.state.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"--state takes a Redis URL (redis://HOST:PORT/DB), not {self.state!r}"
            )
        if self.placement != "ray" and self.ray_address is not None:
            raise ValueError("--ray-address is for --placement ray")


class _Reporter:
    """Prints state changes as ``ketch: ...`` lines (or JSON objects), and the ``ready``
    event once every worker started with the server has joined (tests and scripts wait for
    that line); the one place the server's events reach the plugins' observer hooks."""

    def __init__(self, out: TextIO, log_format: events.LogFormat = "text") -> None:
        self._out = out
        self._format: events.LogFormat = log_format
        self.is_ready: Callable[[], bool] = lambda: False
        self._announced = False
        #: The plugins whose observer hooks hear of each event (workers, pools), once loaded.
        self.observers: Plugins | None = None

    def __call__(self, event: events.Event) -> None:
        # The observers first: whoever sees the line knows they have been told.
        if self.observers is not None:
            self.observers.state_changed(event.kind, event.fields)
        events.write_event(event, self._out, self._format)
        self.announce_if_ready()

    def announce_if_ready(self) -> None:
        if not self._announced and self.is_ready():
            self._announced = True
            events.write_event(events.ready(), self._out, self._format)


class Companions(Protocol):
    """The other gateway processes of ``ketch serve --gateways N``, which this one starts
    (:mod:`ketch.cli.gateways`)."""

    async def start(self, port: int, grpc_port: int | None) -> None:
        """Start them on this gateway's ports (now bound) and wait until they are ready."""

    async def stop(self) -> None:
        """Stop them, giving their requests in flight their grace."""


async def serve(
    options: ServeOptions,
    shutdown: asyncio.Event | None = None,
    out: TextIO = sys.stdout,
    companions: Companions | None = None,
) -> None:
    """Run the gateway until ``shutdown`` is set (or SIGINT/SIGTERM when none is given), then
    give the requests in flight the grace period; a second signal cuts it short. With
    ``companions``, they start once this gateway serves, and it is ready once they are."""
    loop = asyncio.get_running_loop()
    hurry = asyncio.Event()
    if shutdown is None:
        shutdown = asyncio.Event()
        stop = shutdown

        def stop_gracefully() -> None:
            (hurry if stop.is_set() else stop).set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_gracefully)
    report = _Reporter(out, options.log_format)
    # Before any process of the server's exists: the gateway moves itself into a cgroup leaf.
    cgroups = MemoryCgroups.create()
    dispatcher = Dispatcher(report, allow_worker_models=options.allow_worker_models)
    keys = None if options.insecure_broker else BrokerKeys.create(options.broker_keys)
    broker = Broker(
        options.broker,
        dispatcher,
        options.heartbeat,
        ModelSpec.from_dict,
        keys,
        options.broker_max_message_bytes,
    )
    # Every port first: a port in use fails at once, before any import of user code.
    sock = bind_tcp(options.host, options.port, options.reuse_port)
    try:
        grpc_server = (
            GrpcServer(
                options.host, options.grpc_port, options.http.max_body_bytes, options.reuse_port
            )
            if options.grpc_port is not None
            else None
        )
    except OSError:
        sock.close()
        raise
    tokens = Tokens(options.admin_token, options.predict_token)
    deadlines = Deadlines(options.request_timeout_s)
    workers: WorkerProcesses | None = None
    placement: RayPlacement | None = None
    pools: PoolManager | None = None
    apps: Applications | None = None
    shared: SharedState | None = None
    gateways: Gateways | None = None
    shared_changes: SharedChanges | None = None
    deployer: Deployer | None = None
    try:
        endpoint = broker.bind()
        plugins = load_plugins(options.plugins)
        dispatcher.attach(broker, plugins)
        report.observers = plugins
        state_dir = options.state_dir or default_state_dir()
        store = Store(options.store_dir or state_dir / "store")
        store.open()
        environments = Environments(store.envs)
        served = (
            await discover_served(options.source, plugins, environments, report)
            if options.source is not None
            else Served([], [], [])
        )
        given = [_model_argument(text, plugins) for text in options.models]
        specs = [
            msgspec.structs.replace(spec, pool=spec.pool.with_floor(options.workers_per_model))
            for spec in [*served.models, *given]
        ]
        planned = apply_plan(specs, options.plan) if options.plan is not None else None
        if planned is not None:
            specs = planned.specs
        for spec in specs:
            if dispatcher.has_model(spec.key):
                raise TargetLoadError(f"model {spec.label()!r} is declared twice")
            dispatcher.add_model(spec)
        # Only now: a worker that joins knows which model it serves (and one that rejoins
        # after a restart cannot claim a name the served file declares).
        broker.start()
        state_store: StateStore = FileStateStore(state_dir)
        if options.state is not None:
            shared = await _connect_shared(options.state)
            state_store = shared.state_store()
        apps = build_applications(
            served.apps, served.pipelines, plugins, dispatcher, state_store, deadlines, shared
        )
        dispatcher.metrics.watch_apps(apps.samples)
        host, port = sock.getsockname()[:2]
        report(events.broker_listening(endpoint))
        report(events.listening(f"http://{_url_host(host)}:{port}"))
        for app_spec in served.apps:
            report(events.app_started(app_spec.name, app_spec.policy, list(app_spec.models)))
        placement = (
            RayPlacement(
                options.ray_address or "auto", endpoint, options.source, (state_dir, store.root)
            )
            if options.placement == "ray"
            else None
        )
        workers = WorkerProcesses(
            placement.source if placement is not None else options.source or "",
            broker.local_endpoint,
            options.heartbeat,
            ProcessEvents(
                dispatcher.process_started,
                dispatcher.process_exited,
                dispatcher.model_unhealthy,
                dispatcher.model_crash_looping,
                dispatcher.template_changed,
                dispatcher.recycle,
            ),
            plugins,
            broker_keys=keys.local_worker_keys() if keys is not None else None,
            memory_cgroups=cgroups,
            placement=placement,
        )
        pools = PoolManager(dispatcher, workers)
        if shared is not None:
            gateways = _coordinate(shared, broker, keys, pools)
        for spec in specs:
            pools.manage(spec)
        for key, tuner in (planned.tuners if planned is not None else {}).items():
            pools.tune(key, tuner)
        if gateways is not None:
            await gateways.start()
        deployer = Deployer(
            store, environments, plugins, pools, dispatcher, report, options.workers_per_model
        )
        changes = Changes()
        admin = Admin(
            dispatcher,
            pools,
            apps,
            changes,
            plugins,
            report,
            options.request_timeout_s,
            options.workers_per_model,
            on_roll=deployer.rolled,
        )
        repository = Repository(dispatcher, admin, changes, options.model_control)
        if shared is not None:
            shared_changes = await _share_changes(shared, changes, report)
        shared_memory = SharedMemory()
        await deployer.restore()
        if grpc_server is not None:
            service = InferenceService(
                dispatcher,
                deadlines,
                TokenGuard(tokens),
                dispatcher.metrics,
                repository,
                shared_memory,
            )
            await grpc_server.start(service)
            report(events.grpc_listening(grpc_server.address))
        pools.start()
        if companions is not None:
            await companions.start(port, grpc_server.port if grpc_server is not None else None)
        report.is_ready = dispatcher.settled
        report.announce_if_ready()
        apps.start()
        deployments = DeploymentRoutes(
            deployer, admin, options.max_deploy_bytes, options.http.read_timeout_s
        )
        app = Gateway(
            dispatcher,
            apps,
            deadlines,
            admin,
            deployments,
            tokens,
            repository,
            shared_memory,
            options.http.max_body_bytes,
        ).app()
        # What was built at start lives as long as the server: out of the collector's
        # generations, the collections requests cause walk only what requests allocate.
        gc.freeze()
        limits = dataclasses.replace(options.http, streamed=frozenset({UPLOAD_PATH}))
        stopping = asyncio.ensure_future(_stop_grpc(grpc_server, shutdown, limits))
        try:
            await serve_asgi(app, sock, shutdown.wait, limits, hurry.wait)
        finally:
            stopping.cancel()
    finally:
        if companions is not None:
            await companions.stop()
        if grpc_server is not None:
            await grpc_server.stop(0)
        if deployer is not None:
            await deployer.stop()
        sock.close()  # a no-op once serve_asgi has served on it (it closes the socket)
        if apps is not None:
            await apps.stop()
        if shared_changes is not None:
            await shared_changes.stop()
        if gateways is not None:
            await gateways.stop()
        if shared is not None:
            await shared.close()
        log.info("HTTP gateway stopped; stopping workers")
        if pools is not None:
            await pools.stop()
        if workers is not None:
            workers.hold_restarts()
        await broker.close()
        if workers is not None:
            await workers.stop()
        log.info("workers stopped")
        if placement is not None:
            placement.shutdown()
        report.is_ready = lambda: False
        report(events.stopped())


def _coordinate(
    shared: SharedState, broker: Broker[ModelSpec], keys: BrokerKeys | None, pools: PoolManager
) -> Gateways:
    """This gateway among the others that share ``shared``'s Redis: its workers join them
    all, and one of them at a time scales the pools (:mod:`ketch.pools.gateways`)."""
    from ketch.pools.gateways import Announcement, Gateways, reachable_endpoint

    def peers_changed(others: list[Announcement]) -> None:
        broker.set_peers([other.peer() for other in others])
        if keys is not None:
            keys.authorized.trust_peers(
                other.worker_key.encode() for other in others if other.worker_key
            )

    me = Announcement(
        shared.gateway,
        reachable_endpoint(broker.endpoint, shared.url),
        keys.server.public.decode() if keys is not None else None,
        keys.local_workers.public.decode() if keys is not None else None,
    )
    gateways = Gateways(shared.client, me, pools, peers_changed)
    pools.share_load(gateways)
    return gateways


async def _share_changes(
    shared: SharedState, changes: Changes, report: events.Report
) -> SharedChanges:
    """Make the management API's changes through the log the gateways share, after applying
    those already in it (this gateway then serves what the others serve)."""
    import redis

    from ketch.http.shared_changes import SharedChanges

    log_of_changes = SharedChanges(shared, changes)
    try:
        applied = await log_of_changes.catch_up()
    except redis.RedisError as exc:
        raise SharedStateError(f"cannot read the management changes from Redis: {exc}") from None
    if applied:
        report(events.changes_applied(applied))
    changes.share_through(log_of_changes)
    log_of_changes.start()
    return log_of_changes


async def _connect_shared(url: str) -> SharedState:
    """The Redis of ``--state``; its client (0.3 s of imports) is imported only here."""
    try:
        from ketch.applications.shared import SharedState
    except ImportError:
        raise SharedStateError(
            f"--state {url} needs Redis's client: pip install 'ketch[redis]'"
        ) from None
    return await SharedState.connect(url)


async def _stop_grpc(
    grpc_server: GrpcServer | None, shutdown: asyncio.Event, limits: HttpLimits
) -> None:
    """With the HTTP gateway's stop: new gRPC calls refused, those in flight given its grace."""
    if grpc_server is not None:
        await shutdown.wait()
        await grpc_server.stop(limits.shutdown_grace_s)


def _model_argument(text: str, plugins: Plugins) -> ModelSpec:
    """``--model NAME=RUNTIME:PATH`` as a model spec, checked by its runtime."""
    try:
        return plugins.check_deployment(parse_model_argument(text))
    except ValueError as exc:
        raise TargetLoadError(f"--model {text!r}: {exc}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
