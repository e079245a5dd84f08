"""Replay: a `fraction` of every batch drawn from the data earlier versions trained on.

    data.replay.fraction: 0.2
    data.replay.sources: [...]        # named explicitly, or
    data.replay.from_lineage: true    # the parent version's training (and replay) sources, from its record
    data.replay.spread: tokens        # shares in proportion to the tokens the lineage trained on each
    data.replay.final_fraction: 0.05  # the fraction moves linearly to it, in data.replay.phases steps

The mixture itself is the data pipeline's (`lmadapt.data.pipeline`); this method completes the sources from
the parent's record, weighs them (`spread`), checks the forgetting budget's sources against them
(`lmadapt.continual.budget` moves the fraction while training) and describes the replay in the version record.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from lmadapt.config import ConfigError, SourceConfig, section_from_dict
from lmadapt.continual.method import Method

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin
    from lmadapt.lineage.store import Lineage


@dataclasses.dataclass(frozen=True)
class Replay(Method):
    """Always present (the record says "no replay" too); its kind word only when the run replays anything."""

    fraction: float
    parent_record: Any = None  # the parent's version record, when sources come from the lineage
    lineage_tokens: dict[str, int] | None = None  # spread "tokens": tokens per source along the parent's chain
    moves: bool = False  # a final_fraction or a forgetting budget may raise the fraction from `fraction`
    name = "replay"

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> Replay:
        r, record, tokens = cfg.data.replay, None, None
        if origin is not None and origin.lineage is not None and origin.parents:
            if r.from_lineage:
                record = origin.lineage.record(origin.parents[0])
            if r.spread == "tokens":
                tokens = lineage_tokens(origin.lineage, origin.parents[0])
        moves = bool(r.final_fraction) or bool(cfg.continual.forgetting_budget.sources)
        return cls(r.fraction, record, tokens, moves)

    def kind(self) -> str | None:
        return "replay" if self.fraction or self.moves else None

    def prepare(self, cfg: Config) -> Config:
        if cfg.data.replay.from_lineage and self.parent_record is not None:
            cfg = with_lineage_replay(cfg, self.parent_record)
        if self.lineage_tokens is not None:
            cfg = with_token_spread(cfg, self.lineage_tokens)
        check_budget_sources(cfg)
        return cfg


def describe(cfg: Config) -> dict[str, Any]:
    """The replay entry of every version record (the mixture's phases are in the record's data section)."""
    r = cfg.data.replay
    out = {"fraction": r.fraction, "sources": [s.name for s in r.sources], "from_lineage": r.from_lineage,
           "spread": r.spread, "final_fraction": r.final_fraction}
    if r.final_fraction is not None:
        out["phases"] = r.phases
    if r.spread == "tokens":
        out["weights"] = {s.name: s.weight for s in r.sources}
    return out


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


def lineage_tokens(lineage: Lineage, version_id: str) -> dict[str, int]:
    """Tokens trained on each source by `version_id` and all its ancestors (each counted once), from their
    records' data.tokens_seen. Versions missing from the lineage, or records without the field, add nothing."""
    total: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    todo = [version_id]
    while todo:
        vid = todo.pop()
        if vid in seen or not lineage.exists(vid):
            continue
        seen.add(vid)
        record = lineage.record(vid)
        counts = (record.get("data") or {}).get("tokens_seen") or {}
        for name, n in counts.items() if isinstance(counts, dict) else ():
            if isinstance(n, int | float) and n > 0:
                total[name] += int(n)
        todo.extend(record.get("parents") or [])
    return dict(total)


def token_shares(tokens: dict[str, int], names: list[str]) -> dict[str, float]:
    """Each source's share of the replay, in proportion to `tokens`. A source with no tokens recorded gets the
    mean share of those with some (so adding a source never silences it); none recorded: equal shares."""
    known = {n: tokens[n] for n in names if tokens.get(n, 0) > 0}
    if not known:
        return {n: 1.0 / len(names) for n in names}
    total = sum(known.values())
    mean = 1.0 / len(known)
    return {n: known[n] / total if n in known else mean for n in names}


def with_token_spread(cfg: Config, tokens: dict[str, int]) -> Config:
    """The replay sources weighted by `token_shares` (spread "tokens"): the share replaces the source's weight."""
    sources = cfg.data.replay.sources
    if not sources:
        return cfg
    shares = token_shares(tokens, [s.name for s in sources])
    weighted = tuple(dataclasses.replace(s, weight=shares[s.name]) for s in sources)
    replay = dataclasses.replace(cfg.data.replay, sources=weighted)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, replay=replay))


def check_budget_sources(cfg: Config) -> None:
    """Every forgetting-budget source is one of the run's replay sources (known only once from_lineage has
    added the parent's): ConfigError naming the source and the replay sources."""
    names = [s.name for s in cfg.data.replay.sources]
    for name in cfg.continual.forgetting_budget.sources:
        if name not in names:
            raise ConfigError(f"continual.forgetting_budget.sources: {name!r} is not a replay source of this run "
                              f"(replay sources: {', '.join(names) or 'none'}); name replay sources, or set "
                              f"data.replay.from_lineage=true to replay the parent's")
