"""``ketch serve`` and ``ketch worker`` settings from a ``ketch.toml`` file and ``KETCH_*``
environment variables.

One order of precedence, highest first: the command line, then the environment
(``KETCH_<OPTION>``), then the config file (``--config PATH``, else ``./ketch.toml`` when it
exists; its ``[serve]`` table for ``ketch serve``, ``[worker]`` for ``ketch worker``), then the
built-in defaults. The file and the environment only
change the parser's *defaults* (:func:`load_defaults` feeds ``set_defaults``), so the command
line wins without any merging code, and every value goes through the same type function as its
command-line option: a bad value is refused the same way wherever it comes from.

The settings are read off the parser itself, so an option added to ``ketch serve`` is at once
a file key and an environment variable too. Options both commands take (``--log-level``, the
heartbeat's) share their variable, so one ``KETCH_HEARTBEAT_INTERVAL`` sets both ends.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ketch.errors import KetchError

#: The file read when ``--config`` is not given, if it exists in the working folder.
DEFAULT_CONFIG = Path("ketch.toml")
#: Names a config file other than ``./ketch.toml`` (``--config`` is above it).
CONFIG_ENV = "KETCH_CONFIG"
ENV_PREFIX = "KETCH_"
#: The commands a config file configures, each from the table of its name.
SECTIONS = ("serve", "worker")
#: Parser destinations that are not settings (``--config`` cannot name another file).
_NOT_SETTINGS = frozenset({"help", "config"})


class ConfigError(KetchError):
    """A config file or environment variable that cannot be used, and why."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One option of ``ketch serve`` as a file key and an environment variable.

    :param key: the key in ``[serve]``, which is the argparse destination (``state_dir``).
    :param convert: the option's type function (the identity for plain strings).
    :param choices: the values the option accepts, when it restricts them.
    :param many: a repeatable option: a list in the file, ``os.pathsep``-separated in the
        environment.
    """

    key: str
    convert: Callable[[str], Any]
    choices: tuple[Any, ...] | None
    many: bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    def parse(self, text: str, origin: str) -> Any:
        """``text`` through the option's type function; ``origin`` names where it came from."""
        try:
            value = self.convert(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: invalid value {text!r}: {exc}") from None
        if self.choices is not None and value not in self.choices:
            accepted = ", ".join(map(str, self.choices))
            raise ConfigError(f"{origin}: invalid value {text!r}: choose from {accepted}")
        return value


def settings(parser: argparse.ArgumentParser) -> list[Setting]:
    """The settings of every option and positional of ``parser`` (``ketch serve``)."""
    found = []
    # argparse has no public list of a parser's arguments; _actions is stable since 2.7.
    for action in parser._actions:
        if action.dest in _NOT_SETTINGS or action.nargs == 0:
            continue  # flags (store_true) have no value to take from a file
        many = isinstance(action, argparse._AppendAction | ReplaceDefault)
        found.append(
            Setting(
                key=action.dest,
                convert=action.type if callable(action.type) else str,
                choices=tuple(action.choices) if action.choices is not None else None,
                many=many,
            )
        )
    return found


def load_defaults(
    parser: argparse.ArgumentParser,
    config: Path | None,
    environ: Mapping[str, str] | None = None,
    section: str = "serve",
) -> dict[str, Any]:
    """The defaults for ``parser`` from the file and the environment (the latter winning).

    :param section: the command, whose table of the file configures it.
    :param config: the file ``--config`` names; ``None`` reads ``$KETCH_CONFIG``, else
        ``./ketch.toml`` if it exists.
    :raises ConfigError: a missing or malformed file, an unknown key, a bad value.
    """
    env = os.environ if environ is None else environ
    known = {s.key: s for s in settings(parser)}
    values: dict[str, Any] = {}
    path = config or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if path is not None or DEFAULT_CONFIG.is_file():
        values.update(_from_file(path or DEFAULT_CONFIG, known, section))
    values.update(_from_environment(env, known.values()))
    return values


def _from_file(path: Path, known: Mapping[str, Setting], section: str) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    extra_tables = sorted(set(data) - set(SECTIONS))
    if extra_tables:
        tables = " and ".join(f"[{name}]" for name in SECTIONS)
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(extra_tables)}; "
            f"settings go in the {tables} tables"
        )
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: {section} must be a table ([{section}])")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) in [{section}]: {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    return {
        key: _file_value(known[key], value, f"config file {path}: [{section}] {key}")
        for key, value in table.items()
    }


def _file_value(setting: Setting, value: Any, origin: str) -> Any:
    if setting.many:
        # One string is one item, so `plugin = "x.py"` works like `plugin = ["x.py"]`.
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{origin}: expected a list of strings, got {value!r}")
        return [setting.parse(_scalar_text(setting, item, origin), origin) for item in items]
    return setting.parse(_scalar_text(setting, value, origin), origin)


def _scalar_text(setting: Setting, value: Any, origin: str) -> str:
    """A TOML value as the text its option would get on the command line."""
    # bool is an int in Python, but `port = true` is a mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{origin}: expected a string or a number, got {value!r}")
    return str(value)


def _from_environment(env: Mapping[str, str], known: Iterable[Setting]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in known:
        text = env.get(setting.env, "")
        if not text:
            continue  # unset and empty alike: `KETCH_PORT= ketch serve` means "no override"
        origin = f"environment variable {setting.env}"
        if setting.many:
            values[setting.key] = [
                setting.parse(item, origin) for item in text.split(os.pathsep) if item
            ]
        else:
            values[setting.key] = setting.parse(text, origin)
    return values


class ReplaceDefault(argparse.Action):
    """A repeatable option whose first use on the command line replaces its default list
    (from the file or the environment) instead of adding to it, as ``append`` would: the
    command line wins over the other sources for lists too."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        # argparse put the default object itself in the namespace: still the same object
        # means this is the first use on the command line.
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, [*items, values])
