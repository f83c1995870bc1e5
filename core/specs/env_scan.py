"""The environments a file declares (``env=``), read from its source without importing it.

A model that needs an environment usually imports, at the top of its file, a package that
only that environment has: the file cannot be imported to find out what it declares until
the environment exists. So the server reads the ``env=`` of every ``ketch.model(...)`` and
``ketch.deploy(...)`` call from the file's syntax tree first, builds those environments, and
only then imports the file under the environment's interpreter. That is why ``env=`` must be
written as a literal: a list of strings, or a string naming a file.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from ketch.errors import TargetLoadError

#: The calls whose ``env=`` is read: ``ketch.model``/``ketch.deploy`` or the bare names.
_DECLARING = frozenset({"model", "deploy"})

Env = tuple[str, ...] | str


def declared_envs(source: str) -> list[Env]:
    """The distinct ``env=`` values of ``source`` (a ``.py`` file or a module name), in the
    order they appear; a file path is made absolute against the declaring file's folder.

    :raises TargetLoadError: an ``env=`` that is not a literal list of strings or string.
    """
    path = _file_of(source)
    if path is None:
        return []
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError:
        return []  # importing it reports the error with its context
    found: list[Env] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or _called_name(node.func) not in _DECLARING:
            continue
        for keyword in node.keywords:
            if keyword.arg == "env":
                env = _literal_env(keyword.value, path)
                if env is not None and env not in found:
                    found.append(env)
    return found


def _file_of(source: str) -> Path | None:
    if source.endswith(".py") or Path(source).is_file():
        path = Path(source)
        return path.resolve() if path.is_file() else None
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _literal_env(node: ast.expr, path: Path) -> Env | None:
    where = f"{path}:{node.lineno}"
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise TargetLoadError(
            f"{where}: env= must be written as a literal (a list of requirement strings, or a "
            "string naming a requirements file or uv.lock): the server reads it before the "
            "file can be imported"
        ) from None
    if value is None:
        return None
    if isinstance(value, str):
        return str((path.parent / Path(value).expanduser()).resolve())
    if isinstance(value, list | tuple) and all(isinstance(line, str) for line in value):
        return tuple(line.strip() for line in value if line.strip())
    raise TargetLoadError(f"{where}: env= must be a list of strings or a string, got {value!r}")
