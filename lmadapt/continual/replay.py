"""Replay: a `fraction` of every batch drawn from the data earlier versions trained on.

    data.replay.fraction: 0.2
    data.replay.sources: [...]        # named explicitly, or
    data.replay.from_lineage: true    # the parent version's training (and replay) sources, from its record

The mixture itself is the data pipeline's (`lmadapt.data.pipeline`); this method only completes the sources
from the parent's record and describes the replay in the version record.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from lmadapt.config import ConfigError, SourceConfig, section_from_dict
from lmadapt.continual.method import Method

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin


@dataclasses.dataclass(frozen=True)
class Replay(Method):
    """Always present (the record says "no replay" too); its kind word only when `fraction` > 0."""

    fraction: float
    parent_record: Any = None  # the parent's version record, when sources come from the lineage
    name = "replay"

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> Replay:
        record = None
        if cfg.data.replay.from_lineage and origin is not None and origin.lineage is not None and origin.parents:
            record = origin.lineage.record(origin.parents[0])
        return cls(cfg.data.replay.fraction, record)

    def kind(self) -> str | None:
        return "replay" if self.fraction else None

    def prepare(self, cfg: Config) -> Config:
        return cfg if self.parent_record is None else with_lineage_replay(cfg, self.parent_record)


def describe(cfg: Config) -> dict[str, Any]:
    """The replay entry of every version record."""
    r = cfg.data.replay
    return {"fraction": r.fraction, "sources": [s.name for s in r.sources], "from_lineage": r.from_lineage}


def with_lineage_replay(cfg: Config, parent: dict[str, Any]) -> Config:
    """Add the parent's training sources (and its own replay sources) to this run's replay sources."""
    data = parent.get("config", {}).get("data", {})
    have = {s.name for s in cfg.data.sources} | {s.name for s in cfg.data.replay.sources}
    extra = []
    for raw in [*data.get("sources", []), *data.get("replay", {}).get("sources", [])]:
        if raw["name"] not in have:
            extra.append(section_from_dict(SourceConfig, raw, f"version {parent['id']}", "data.sources."))
            have.add(raw["name"])
    if not extra and not cfg.data.replay.sources:
        raise ConfigError(f"data.replay.from_lineage: version {parent['id']!r} records no data sources that this "
                          f"run does not already train on")
    replay = dataclasses.replace(cfg.data.replay, sources=(*cfg.data.replay.sources, *extra))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, replay=replay))
