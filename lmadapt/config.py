"""The run configuration: one typed dataclass tree, loaded from YAML plus `key.sub=value` overrides.

Everything a run needs is here and validated once, at the edge (`load_config`). Modules receive the
sub-config they need (`cfg.model`, `cfg.mesh`, ...) and may trust it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file, the key, the value and what was expected."""


# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """A decoder-only transformer. `family` picks the block layout; sizes follow Hugging Face names."""

    family: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 320  # room for the default byte tokenizer (259)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 256  # Llama: intermediate_size; GPT-2: n_inner (4 * d_model)
    max_seq_len: int = 256
    rope_theta: float = 10000.0  # Llama only
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # GPT-2 always ties (validated)
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (mixed precision)
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = False
    attention: Literal["auto", "xla", "cudnn", "einsum"] = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


# Logical axis name -> mesh axes. Kept as data (MaxText style): a user re-shards by editing YAML.
DEFAULT_RULES: list[list[Any]] = [
    ["batch", ["data", "fsdp"]],
    ["activation_length", None],
    ["activation_embed", "tensor"],
    ["activation_heads", "tensor"],
    ["activation_kv_heads", "tensor"],
    ["activation_mlp", "tensor"],
    ["activation_vocab", "tensor"],
    ["embed", "fsdp"],
    ["vocab", "tensor"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["head_dim", None],
    ["mlp", "tensor"],
    ["position", None],
    ["norm", None],
    ["layers", None],
    ["cache_batch", ["data", "fsdp"]],
    ["cache_length", None],
]


@dataclass
class MeshConfig:
    """Device mesh sizes; -1 takes all remaining devices (at most one axis may say -1)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: list[list[Any]] = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])


@dataclass
class DistributedConfig:
    """Multi-host start-up. `auto` initialises when the environment says it is a cluster job."""

    mode: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None
    initialization_timeout: int = 300  # seconds
    # A process that misses heartbeats this long is declared dead by the coordinator, which then aborts
    # the others, so a killed peer ends the job instead of leaving the survivors blocked in a collective.
    heartbeat_timeout: int = 100  # seconds (JAX's default)
    # How long the processes wait for each other at exit (JAX's shutdown barrier).
    shutdown_timeout: int = 300  # seconds (JAX's default)


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass
class TokenizerConfig:
    """`bytes` (no training, vocab 259) or a SentencePiece model: `path` to any `.model` file, or null to
    train one (`vocab_size`, `model_type`) on the run's training sources, cached by their fingerprints."""

    kind: Literal["bytes", "sentencepiece"] = "bytes"
    path: str | None = None
    vocab_size: int = 2048
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    user_defined_symbols: list[str] = field(default_factory=list)


@dataclass
class SourceConfig:
    """One named data source of the mixture.

    kind `text`: files, folders or globs (plain, .gz, .xz) cut into documents by `documents`.
    kind `jsonl`: `format` text (`text_field`), prompt_completion (loss on the completion only), or
    classification (`text_field` + `label_field`, rendered as `template` -> " " + label, labels in `labels`).
    kind `tfds`: `dataset` ("name" or "name:version") `split` and `feature` from a local `data_dir`.
    """

    name: str = ""
    kind: Literal["text", "jsonl", "tfds"] = "text"
    path: str | None = None
    weight: float = 1.0
    documents: Literal["file", "blank_line", "chars"] = "chars"
    max_chars: int = 4096
    format: Literal["text", "prompt_completion", "classification"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    label_field: str = "label"
    labels: list[str] | None = None
    template: str = "{text}\nLabel:"
    dataset: str | None = None
    split: str = "train"
    feature: str = "text"
    data_dir: str | None = None


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(name="shakespeare", path="data/shakespeare.txt.xz")]


@dataclass
class ReplayConfig:
    """Replay: `fraction` of every batch drawn from `sources` (the data earlier versions trained on)."""

    fraction: float = 0.0
    sources: list[SourceConfig] = field(default_factory=list)
    from_lineage: bool = False  # add the sources (and replay sources) the parent version was trained on


@dataclass
class DataConfig:
    """Training data: a weighted mixture of `sources` plus replay, packed into rows of train.seq_len."""

    sources: list[SourceConfig] = field(default_factory=_default_sources)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    val_fraction: float = 0.05  # of each source's documents, held out (deterministically) for eval
    seed: int = 0
    cache_dir: str = "~/.cache/lmadapt"  # tokenized sources and trained tokenizers, reused across runs
    long_docs: Literal["split", "truncate"] = "split"  # documents longer than train.seq_len (counted)
    decode_errors: Literal["replace", "fail"] = "replace"  # undecodable bytes (replaced ones are counted)
    # One document (or JSONL line) larger than this is refused by name: a file that is one giant line is
    # more likely a mistake (a dump, a minified blob) than text, and it would be held whole in memory.
    max_document_bytes: int = 64 * 2**20


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 256
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many parts
    # A step with a non-finite loss or gradient never updates the params; then "skip" counts it and goes
    # on, "stop" ends the run with an error. Either way the run stops after this many in a row (0: never).
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_in_a_row: int = 10


@dataclass
class GroupConfig:
    """A parameter group: the parameters any `select` entry matches (first group wins; the rest form
    "default"). Entries: embeddings, attention, mlp, norms, head, biases, lora, base, `layers:A-B`
    (blocks A..B inclusive), `re:REGEX` (on paths like layers_0/attn/q/kernel); join with '+' for AND."""

    name: str = ""
    select: list[str] = field(default_factory=list)
    frozen: bool = False  # no updates and no optimizer state
    lr_scale: float = 1.0
    weight_decay: bool | None = None  # null: decay matrices only (not norms, biases, vectors)


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # global-norm clip; None disables
    groups: list[GroupConfig] = field(default_factory=list)
    carry_state: bool = False  # start from the parent version's optimizer state (saved with lineage.save_opt_state)


@dataclass
class ScheduleConfig:
    """Every run (each continual stage included) starts its schedule at step 0: warmup re-warms the
    learning rate and the decay re-decays it. `wsd`: warmup, stable, then linear decay over the last
    `decay_fraction` of the steps ("infinite" schedule)."""

    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: train.steps
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd only


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0 disables periodic saves (a final and a preemption save still happen)
    keep: int = 3  # the newest N checkpoints...
    keep_every: int = 0  # ...plus every checkpoint at a multiple of this many steps (0: none)
    async_save: bool = True


@dataclass
class EvalConfig:
    every: int = 500  # steps; 0 disables
    batches: int = 4


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metric fetches (the only host sync in the loop)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0


@dataclass
class FisherConfig:
    """Estimate the diagonal Fisher of the run's result on its training data and publish it with the
    version (EWC in a later stage reads it). Online EWC: the parent's Fisher times `gamma` is added."""

    compute: bool = False
    kind: Literal["empirical", "true"] = "empirical"
    batches: int = 8
    gamma: float = 1.0


@dataclass
class DistillConfig:
    """Distillation: loss = data_weight * CE + weight * T^2 * KL(teacher_T || student_T) on the run's data.
    teacher "parent" (LwF / self-distillation) or a version id (e.g. a bigger model, for a smaller student)."""

    weight: float = 0.0
    temperature: float = 2.0
    teacher: str = "parent"
    data_weight: float = 1.0


@dataclass
class LoraConfig:
    """Low-rank adapters on `targets` (q, k, v, o, gate, up, down); the base is frozen. rank 0: off."""

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])


@dataclass
class ContinualConfig:
    """Regularised updates toward the parent version theta*: L2-SP and EWC weights (lambda), distillation,
    LoRA, and the Fisher estimate this run publishes."""

    l2sp: float = 0.0
    ewc: float = 0.0
    fisher: FisherConfig = field(default_factory=FisherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class InitConfig:
    """Where a run's params start: fresh (both null), a lineage version, or a Hugging Face directory."""

    from_version: str | None = None
    from_hf: str | None = None


@dataclass
class LineageConfig:
    """`dir`: the lineage that `init.from_version` reads and a finished run publishes into (null: no publish)."""

    dir: str | None = None
    save_opt_state: bool = False  # also publish the optimizer state (for optimizer.carry_state in a child)


@dataclass
class VersionConfig:
    """The version a finished run publishes: `id` (null: generated from the time and run) and a note."""

    id: str | None = None
    note: str = ""


@dataclass
class StageConfig:
    """One stage of a staged run: a version name and the overrides that make its config."""

    name: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init: InitConfig = field(default_factory=InitConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    lineage: LineageConfig = field(default_factory=LineageConfig)
    version: VersionConfig = field(default_factory=VersionConfig)
    stages: list[StageConfig] = field(default_factory=list)  # a staged run (see lmadapt.stages)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (with `base:` includes), apply `key.sub=value` overrides, validate.

    Raises ConfigError with one line naming the file, key, value and expectation.
    """
    raw: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        raw = _read_yaml_tree(os.fspath(path), seen=())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        _set_dotted(raw, key.strip(), value, origin="command line")
    cfg = _build(Config, raw, prefix="", origin=origin)
    validate(cfg, origin)
    return cfg


def section_from_dict(cls: type, raw: dict[str, Any], origin: str = "<dict>", prefix: str = "") -> Any:
    """One config section (e.g. ModelConfig) from a plain dict, with the same checks as a YAML file."""
    return _build(cls, raw, prefix=prefix, origin=origin)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (YAML/JSON-ready) of a config tree."""
    return dataclasses.asdict(cfg)


def _read_yaml_tree(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({_yaml_problem(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: key 'base' has value {bases!r}; expected a config file path or a list of them")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):  # name the including file too: the user edits that one
            raise ConfigError(f"{path}: key 'base' has value {base!r}; config file {base_path!r} not found")
        _deep_merge(merged, _read_yaml_tree(base_path, seen + (real,)))
    _deep_merge(merged, data)
    return merged


def _yaml_problem(e: Exception) -> str:
    # `problem` is PyYAML's one-line description; errors without one (a reader error on a control
    # character) print a multi-line text with the position, flattened here to keep errors to one line.
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):  # `data.sources.0.path=...` indexes a list of sections
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{origin}: key {key!r}: {'.'.join(parts[:i])} has {len(node)} entries; "
                                  f"{p!r} is not one of their indices")
            node = node[int(p)]
            continue
        if p not in node and parts[i + 1].isdigit():
            raise ConfigError(f"{origin}: key {key!r}: {'.'.join(parts[:i + 1])} is not set in the config file, so it "
                              f"has no entry {parts[i + 1]} (set the whole list: {'.'.join(parts[:i + 1])}=[...])")
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"{origin}: key {key!r}: {p!r} is not a section")
        node = nxt
    if isinstance(node, list):
        if not parts[-1].isdigit() or int(parts[-1]) >= len(node):
            raise ConfigError(f"{origin}: key {key!r}: {'.'.join(parts[:-1])} has {len(node)} entries")
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, origin: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: key {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be ints or null too
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(f"{origin}: unknown key {key!r} (known keys under {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key + ".", origin)
        else:
            kwargs[name] = _coerce(value, hint, key, origin)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{origin}: key {key!r} has value {value!r}; expected {_type_name(hint)}")

    org = typing.get_origin(hint)
    if org in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError:
                continue
        raise bad()
    if org is Literal:
        choices = typing.get_args(hint)
        # YAML 1.1 reads a bare on/off as a bool; take the user at their word for on/off choices.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            return "on" if value else "off"
        if value in choices and not isinstance(value, bool):
            return value
        raise bad()
    if hint is type(None):
        if value is None:
            return None
        raise bad()
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users mean a number.
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise bad()
        if not math.isfinite(number):  # .inf / .nan would only surface as a diverged run, much later
            raise ConfigError(f"{origin}: key {key!r} has value {value!r}; expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    if org is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(hint) or (Any,)
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{key}.{i}.", origin) for i, v in enumerate(value)]
        return [_coerce(v, item, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if hint is Any:
        return value
    raise bad()


# --------------------------------------------------------------------------------------------------
# Validation: cross-field checks, once
# --------------------------------------------------------------------------------------------------


def validate(cfg: Config, origin: str = "<config>") -> None:
    """Check values and relations between them; raise ConfigError naming the first problem."""

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{origin}: key {key!r} has value {value!r}; expected {expected}")

    m = cfg.model
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        need(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "a positive integer")
    need(m.n_kv_heads is None or m.n_kv_heads > 0, "model.n_kv_heads", m.n_kv_heads, "a positive integer or null")
    need(m.n_heads % m.kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
         f"a divisor of model.n_heads={m.n_heads}")
    need(m.head_dim is not None or m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
         f"a divisor of model.d_model={m.d_model} (or set model.head_dim)")
    need(m.head_dim is None or m.head_dim > 0, "model.head_dim", m.head_dim, "a positive integer or null")
    need(m.family == "gpt2" or m.dim_per_head % 2 == 0, "model.head_dim", m.dim_per_head,
         "an even head size (RoPE rotates pairs)")
    need(m.family != "gpt2" or m.tie_embeddings, "model.tie_embeddings", m.tie_embeddings,
         "true for the gpt2 family (GPT-2 ties its input and output embeddings)")
    need(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "a positive number")

    t = cfg.train
    need(t.steps > 0, "train.steps", t.steps, "a positive integer")
    need(t.batch_size > 0, "train.batch_size", t.batch_size, "a positive integer")
    need(t.seq_len > 0, "train.seq_len", t.seq_len, "a positive integer")
    need(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len, f"at most model.max_seq_len={m.max_seq_len}")
    need(t.microbatches > 0, "train.microbatches", t.microbatches, "a positive integer")
    need(t.max_nonfinite_in_a_row >= 0, "train.max_nonfinite_in_a_row", t.max_nonfinite_in_a_row,
         "a non-negative integer")
    need(t.batch_size % t.microbatches == 0, "train.microbatches", t.microbatches,
         f"a divisor of train.batch_size={t.batch_size}")

    mesh = cfg.mesh
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    for name, v in sizes.items():
        need(v == -1 or v > 0, f"mesh.{name}", v, "a positive integer or -1 (all remaining devices)")
    need(sum(v == -1 for v in sizes.values()) <= 1, "mesh", sizes, "at most one axis set to -1")
    for i, rule in enumerate(mesh.rules):
        ok = (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)
              and (rule[1] is None or (isinstance(rule[1], str) and rule[1] in sizes)
                   or (isinstance(rule[1], list) and all(isinstance(a, str) and a in sizes for a in rule[1]))))
        need(ok, f"mesh.rules[{i}]", rule, "[logical_name, mesh_axis | [mesh_axes] | null]")

    o = cfg.optimizer
    need(o.lr > 0, "optimizer.lr", o.lr, "a positive number")
    need(0 <= o.b1 < 1, "optimizer.b1", o.b1, "a number in [0, 1)")
    need(0 <= o.b2 < 1, "optimizer.b2", o.b2, "a number in [0, 1)")
    need(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    need(o.grad_clip is None or o.grad_clip > 0, "optimizer.grad_clip", o.grad_clip, "a positive number or null")
    s = cfg.schedule
    need(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "an integer >= 0")
    need(s.decay_steps is None or s.decay_steps > 0, "schedule.decay_steps", s.decay_steps, "a positive integer")
    need(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "a number in [0, 1]")

    need(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "an integer >= 0")
    need(cfg.checkpoint.keep > 0, "checkpoint.keep", cfg.checkpoint.keep, "a positive integer")
    need(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", cfg.checkpoint.keep_every, "an integer >= 0")
    need(cfg.eval.every >= 0, "eval.every", cfg.eval.every, "an integer >= 0")
    need(cfg.eval.batches > 0, "eval.batches", cfg.eval.batches, "a positive integer")
    need(cfg.logging.every > 0, "logging.every", cfg.logging.every, "a positive integer")
    need(bool(cfg.run.dir), "run.dir", cfg.run.dir, "a directory path")
    for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        v = getattr(cfg.distributed, name)
        need(v > 0, f"distributed.{name}", v, "a positive number of seconds")
    # Seeds feed numpy and JAX generators, which take unsigned 32-bit seeds (a negative one fails deep inside).
    for key, seed in (("run.seed", cfg.run.seed), ("data.seed", cfg.data.seed)):
        need(0 <= seed < 2**32, key, seed, "an integer in [0, 2**32)")
    _validate_data(cfg, need)
    need(cfg.init.from_version is None or cfg.init.from_hf is None, "init.from_hf", cfg.init.from_hf,
         "null when init.from_version is set (a run starts from one place)")
    need(cfg.init.from_version is None or cfg.lineage.dir is not None, "lineage.dir", cfg.lineage.dir,
         "the lineage directory that holds init.from_version")
    _validate_continual(cfg, need)
    for i, stage in enumerate(cfg.stages):
        need(_VERSION_RE.fullmatch(stage.name) is not None, f"stages.{i}.name", stage.name, "a version id")
    need(not cfg.stages or cfg.lineage.dir is not None, "lineage.dir", cfg.lineage.dir,
         "a lineage directory: the stages publish their versions there")
    for key, vid in (("init.from_version", cfg.init.from_version), ("version.id", cfg.version.id)):
        need(vid is None or (_VERSION_RE.fullmatch(vid) is not None and ".." not in vid), key, vid,
             "a version id: letters, digits, '_', '-' or '.', no path separators or '..'")


def _validate_continual(cfg: Config, need: Callable[[bool, str, Any, str], None]) -> None:
    c, started = cfg.continual, cfg.init.from_version or cfg.init.from_hf
    for key, value in (("continual.l2sp", c.l2sp), ("continual.ewc", c.ewc), ("continual.distill.weight",
                                                                                 c.distill.weight)):
        need(value >= 0, key, value, "a number >= 0")
        need(value == 0 or bool(started) or (key == "continual.distill.weight" and c.distill.teacher != "parent"),
             key, value, "0 unless the run starts from a version (init.from_version or init.from_hf)")
    need(c.ewc == 0 or cfg.init.from_version is not None, "continual.ewc", c.ewc,
         "0 unless init.from_version names a version that carries a Fisher estimate")
    need(c.distill.temperature > 0, "continual.distill.temperature", c.distill.temperature, "a positive number")
    need(c.lora.rank >= 0, "continual.lora.rank", c.lora.rank, "an integer >= 0 (0: no LoRA)")
    need(c.lora.rank == 0 or bool(started), "continual.lora.rank", c.lora.rank,
         "0 unless the run starts from a version (LoRA adapts existing weights)")
    for t in c.lora.targets:
        need(t in ("q", "k", "v", "o", "gate", "up", "down"), "continual.lora.targets", c.lora.targets,
             "a list of q, k, v, o, gate, up, down")
    need(c.fisher.batches > 0, "continual.fisher.batches", c.fisher.batches, "a positive integer")
    need(0 <= c.fisher.gamma <= 1, "continual.fisher.gamma", c.fisher.gamma, "a number in [0, 1]")
    need(not cfg.optimizer.carry_state or cfg.init.from_version is not None, "optimizer.carry_state", True,
         "false unless init.from_version names a version published with lineage.save_opt_state=true")
    need(not cfg.data.replay.from_lineage or cfg.init.from_version is not None, "data.replay.from_lineage", True,
         "false unless init.from_version is set (the replay sources come from its record)")
    need(0 < cfg.schedule.decay_fraction <= 1, "schedule.decay_fraction", cfg.schedule.decay_fraction,
         "a number in (0, 1]")
    for i, g in enumerate(cfg.optimizer.groups):
        need(_NAME_RE.fullmatch(g.name) is not None, f"optimizer.groups.{i}.name", g.name, "a name")
        need(bool(g.select), f"optimizer.groups.{i}.select", g.select, "at least one selector")
        need(g.lr_scale >= 0, f"optimizer.groups.{i}.lr_scale", g.lr_scale, "a number >= 0")


def _validate_data(cfg: Config, need: Callable[[bool, str, Any, str], None]) -> None:
    d, tok = cfg.data, cfg.tokenizer
    need(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "a number in (0, 1)")
    need(d.max_document_bytes > 0, "data.max_document_bytes", d.max_document_bytes, "a positive integer")
    need(tok.kind != "bytes" or cfg.model.vocab_size >= 259, "model.vocab_size", cfg.model.vocab_size,
         "at least 259 for the byte tokenizer (256 bytes + bos, eos, pad)")
    need(tok.kind != "sentencepiece" or tok.path is not None or 16 <= tok.vocab_size <= cfg.model.vocab_size,
         "tokenizer.vocab_size", tok.vocab_size, f"between 16 and model.vocab_size={cfg.model.vocab_size}")
    need(bool(d.sources), "data.sources", d.sources, "at least one source")
    need(0 <= d.replay.fraction < 1, "data.replay.fraction", d.replay.fraction, "a number in [0, 1)")
    need(d.replay.fraction == 0 or bool(d.replay.sources) or d.replay.from_lineage, "data.replay.sources",
         d.replay.sources, "at least one source when data.replay.fraction > 0 (or data.replay.from_lineage=true)")
    seen: set[str] = set()
    groups = [("data.sources", d.sources), ("data.replay.sources", d.replay.sources)]
    for group, sources in groups:
        for i, src in enumerate(sources):
            key = f"{group}.{i}"
            need(_NAME_RE.fullmatch(src.name) is not None, f"{key}.name", src.name,
                 "a name of letters, digits, '_', '-' or '.' (it names logs and cache entries)")
            need(src.name not in seen, f"{key}.name", src.name, "a name not used by another source")
            seen.add(src.name)
            need(src.weight > 0, f"{key}.weight", src.weight, "a positive number")
            need(src.max_chars > 0, f"{key}.max_chars", src.max_chars, "a positive integer")
            if src.kind in ("text", "jsonl"):
                need(bool(src.path), f"{key}.path", src.path, f"a file, folder or glob for kind {src.kind!r}")
            if src.kind == "tfds":
                need(bool(src.dataset), f"{key}.dataset", src.dataset, "a tfds dataset name for kind 'tfds'")
            if src.format == "classification":
                need(bool(src.labels), f"{key}.labels", src.labels, "the list of labels for format 'classification'")
                need("{text}" in src.template, f"{key}.template", src.template, "a template containing {text}")
