"""Named continual-update recipes: `continual.recipe: replay-rewarm` sets a measured combination of keys.

A recipe is data: dotted keys and values, applied to a run that starts from a version (`init.from_version`)
under every key the config file or the command line sets (those win), so `continual.recipe=replay-rewarm
data.replay.fraction=0.4` is the recipe with more replay. A run without init.from_version (a base, or the
first stage of a staged config that names the recipe once at the top) is unchanged. The version record keeps
the recipe's name and, in its config, every value it set. docs/continual.md has the measurements behind each.
"""

from __future__ import annotations

from typing import Any

from lmadapt.config.base import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    # Half of every batch replayed from the lineage's data (each earlier source an equal share), and the
    # schedule re-warmed to the full peak and re-decayed in every update: measured best of the sweep, where a
    # lower or carried peak, averaging and ramps all did worse (docs/continual.md, "The recipe").
    "replay-rewarm": {
        "data.replay.fraction": 0.5,
        "data.replay.from_lineage": True,
        "data.replay.spread": "equal",
        "schedule.rewarm_fraction": 1.0,
    },
}


def _is_set(raw: dict[str, Any], key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_recipe(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """`raw` (the config as plain data, before typing) with its recipe's keys filled in where unset.

    Raises ConfigError naming the recipe and the known ones if it is not one of them."""
    name = (raw.get("continual") or {}).get("recipe") if isinstance(raw.get("continual"), dict | None) else None
    if name is None:
        return raw
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"{origin}: key 'continual.recipe' has value {name!r}; expected one of "
                          f"{', '.join(RECIPES)} (or null)")
    if not (raw.get("init") or {}).get("from_version"):
        return raw
    for key, value in RECIPES[name].items():
        if not _is_set(raw, key):
            node = raw
            for part in key.split(".")[:-1]:
                node = node.setdefault(part, {})
                if node is None:
                    break
            else:
                node[key.rsplit(".", 1)[-1]] = value
    return raw
