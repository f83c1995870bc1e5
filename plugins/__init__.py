"""Built-in selection policies, registered through the same hooks as third-party plugins.

Each module in :data:`BUILTIN_PLUGINS` is a pluggy plugin: it implements
``ketch_register_policies`` (or, for :mod:`ketch.plugins.rewards`, ``ketch_reward_of``), and the
gateway registers them before any installed plugin.
"""

from __future__ import annotations

#: The dotted names of the built-in plugin modules, in the order they are registered.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "ketch.plugins.single",
    "ketch.plugins.split",
    "ketch.plugins.shadow",
    "ketch.plugins.ensemble",
    "ketch.plugins.cascade",
    "ketch.plugins.bandits",
    "ketch.plugins.exp4",
    "ketch.plugins.rewards",
)
