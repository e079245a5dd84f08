"""The run configuration's typed dataclass tree: every key, its type, default and meaning.

Every section is frozen and hashable (sequences are tuples), so code derives a changed config with
`dataclasses.replace` and jitted functions may take a section, a ModelConfig above all, as a static argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lmadapt.config.base import _Frozen
from lmadapt.config.continual import ContinualConfig

# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeScalingConfig(_Frozen):
    """RoPE frequency scaling, as transformers' `rope_scaling` / `rope_parameters` (Llama 3.x, long-context
    checkpoints). `default`: none; `linear`: positions / factor; `dynamic`: NTK base growth past
    `original_max_len`; `llama3`: per-band frequency scaling; `yarn`: NTK-by-parts with an attention factor."""

    type: Literal["default", "linear", "dynamic", "llama3", "yarn"] = "default"
    factor: float = 1.0
    original_max_len: int | None = None  # original_max_position_embeddings (None: model.max_seq_len)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None derives it from factor (and mscale)
    mscale: float | None = None  # yarn (DeepSeek-style)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions


@dataclass(frozen=True)
class ModelConfig(_Frozen):
    """A decoder-only transformer. `family` picks the block layout (lmadapt/families.py); sizes and the
    per-checkpoint options follow Hugging Face names."""

    family: Literal["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"] = "llama"
    vocab_size: int = 320  # room for the default byte tokenizer (259)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 256  # Llama: intermediate_size; GPT-2: n_inner (4 * d_model)
    max_seq_len: int = 256
    rope_theta: float = 10000.0  # families with RoPE
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # GPT-2 always ties (validated)
    # Sliding-window attention (mistral, gemma2): a query sees the `sliding_window` newest keys, itself
    # included. null: full attention everywhere.
    sliding_window: int | None = None
    # With a window: 0 = every layer local (Mistral); N = every Nth layer (i % N == N - 1) global, the
    # others local (Gemma 2: 2, layer 0 local).
    global_layer_every: int = 0
    attn_softcap: float | None = None  # gemma2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # gemma2: logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: float | None = None  # gemma2: scores scaled by this ** -0.5 (null: head_dim)
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Compute dtype (params stay param_dtype, dots accumulate in float32). auto: bfloat16 on GPU/TPU and on CPUs
    # with BF16 units under jax >= 0.11, else float32 (lmadapt/precision.py); the run says which at start-up.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = False
    attention: Literal["auto", "xla", "cudnn", "einsum"] = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i (None: full attention)."""
        if self.sliding_window is None:
            return None
        n = self.global_layer_every
        return None if n and i % n == n - 1 else self.sliding_window


# Logical axis name -> mesh axes. Kept as data (MaxText style): a user re-shards by editing YAML.
# Pairs (name, axis | (axes) | None), each written as a list [name, axes] in YAML.
DEFAULT_RULES: tuple[tuple[Any, ...], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("position", None),
    ("norm", None),
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)


@dataclass(frozen=True)
class MeshConfig(_Frozen):
    """Device mesh sizes; -1 takes all remaining devices (at most one axis may say -1)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[Any, ...], ...] = DEFAULT_RULES


@dataclass(frozen=True)
class DistributedConfig(_Frozen):
    """Multi-host start-up. `auto` initialises when the environment says it is a cluster job."""

    mode: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300  # seconds
    # A process that misses heartbeats this long is declared dead by the coordinator, which then aborts
    # the others, so a killed peer ends the job instead of leaving the survivors blocked in a collective.
    heartbeat_timeout: int = 100  # seconds (JAX's default)
    # How long the processes wait for each other at exit (JAX's shutdown barrier).
    shutdown_timeout: int = 300  # seconds (JAX's default)


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class TokenizerConfig(_Frozen):
    """The run's tokenizer (a run started from a model version or HF checkpoint keeps that one's instead).

    `bytes`: UTF-8 bytes, no training, vocab 259. `bpe`: a lossless byte-level BPE (as GPT-2, Llama 3, Qwen)
    trained (`vocab_size`) on the run's training sources, or a `path` to a tokenizer.json. `sentencepiece`:
    `path` to any `.model` file, or null to train one (`vocab_size`, `model_type`, `byte_fallback`) that keeps
    every character but "\u2581", which SentencePiece decodes as a space.
    `hf`: `path` to a tokenizer.json or a Hugging Face tokenizer directory (tokenizer.json, else tokenizer.model;
    special tokens and chat template from the tokenizer_config.json beside it). Trained tokenizers are cached
    by their settings and the sources' fingerprints; `user_defined_symbols` become tokens of their own in them."""

    kind: Literal["bytes", "bpe", "sentencepiece", "hf"] = "bytes"
    path: str | None = None
    vocab_size: int = 2048
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    user_defined_symbols: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceConfig(_Frozen):
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
    labels: tuple[str, ...] | None = None
    template: str = "{text}\nLabel:"
    dataset: str | None = None
    split: str = "train"
    feature: str = "text"
    data_dir: str | None = None


@dataclass(frozen=True)
class ReplayConfig(_Frozen):
    """Replay: `fraction` of every batch drawn from `sources` (the data earlier versions trained on).

    `spread`: the replay share divided equally among the sources, or in proportion to the tokens the lineage
    trained on each (the parent's records, summed along its chain). `final_fraction`: the fraction moves
    linearly from `fraction` to it over the run, in `phases` equal steps (each a constant mixture)."""

    fraction: float = 0.0
    sources: tuple[SourceConfig, ...] = ()
    from_lineage: bool = False  # add the sources (and replay sources) the parent version was trained on
    spread: Literal["equal", "tokens"] = "equal"
    final_fraction: float | None = None  # None: `fraction` throughout
    phases: int = 4


@dataclass(frozen=True)
class DataConfig(_Frozen):
    """Training data: a weighted mixture of `sources` plus replay, packed into rows of train.seq_len."""

    sources: tuple[SourceConfig, ...] = (SourceConfig(name="shakespeare", path="data/shakespeare.txt.xz"),)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    val_fraction: float = 0.05  # of each source's documents, held out (deterministically) for eval
    seed: int = 0
    cache_dir: str = "~/.cache/lmadapt"  # tokenized sources and trained tokenizers, reused across runs
    long_docs: Literal["split", "truncate"] = "split"  # documents longer than train.seq_len (counted)
    decode_errors: Literal["replace", "fail"] = "replace"  # undecodable bytes (replaced ones are counted)
    # One document (or JSONL line) larger than this is refused by name: a file that is one giant line is
    # more likely a mistake (a dump, a minified blob) than text, and it would be held whole in memory.
    max_document_bytes: int = 64 * 2**20
    # Processes that tokenize a source's uncached files, one file each at a time (0: one per core once 64 MB
    # or more is to be encoded, else this process). The tokens are the same whatever the count.
    workers: int = 0
    # Read the corpus in this many parts (as many as the job's processes, or a multiple): each source's files
    # are dealt to the readers and block g of every batch comes from reader g's files, so a process reads only
    # the files of its rows. Batches depend on it (never on the process count); 1: one reader, as before.
    readers: int = 1
    # Documents planned together: a window's training pieces are shuffled and packed into rows on their own
    # (planning memory follows the window, not the corpus); every epoch draws rows across all windows.
    shuffle_window: int = 1 << 18


@dataclass(frozen=True)
class TrainConfig(_Frozen):
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 256
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many parts
    # A step with a non-finite loss or gradient never updates the params; then "skip" counts it and goes
    # on, "stop" ends the run with an error. Either way the run stops after this many in a row (0: never).
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_in_a_row: int = 10


@dataclass(frozen=True)
class GroupConfig(_Frozen):
    """A parameter group: the parameters any `select` entry matches (first group wins; the rest form
    "default"). Entries: embeddings, attention, mlp, norms, head, biases, lora, base, `layers:A-B`
    (blocks A..B inclusive), `re:REGEX` (on paths like layers_0/attn/q/kernel); join with '+' for AND."""

    name: str = ""
    select: tuple[str, ...] = ()
    frozen: bool = False  # no updates and no optimizer state
    lr_scale: float = 1.0
    weight_decay: bool | None = None  # null: decay matrices only (not norms, biases, vectors)


@dataclass(frozen=True)
class OptimizerConfig(_Frozen):
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # global-norm clip; None disables
    groups: tuple[GroupConfig, ...] = ()
    carry_state: bool = False  # start from the parent version's optimizer state (saved with lineage.save_opt_state)


@dataclass(frozen=True)
class ScheduleConfig(_Frozen):
    """The learning rate over the run. By default every run (each continual stage included) starts its
    schedule at step 0: warmup re-warms the learning rate and the decay re-decays it. `wsd`: warmup,
    stable, then linear decay over the last `decay_fraction` of the run's steps.

    For a run started from a version: `rewarm_fraction` sets the peak to that fraction of the parent's
    peak (its record's `schedule.peak_lr`) instead of optimizer.lr; `carry` continues the parent's schedule
    position: step t of this run is step (parent's position + t) of one schedule spanning the lineage
    (cosine: over `decay_steps`, or to the end of this run when null; warmup only where the carried position
    is still inside it). The record keeps this run's peak and end position for its children."""

    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: train.steps (with carry: the carried position + train.steps)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd only
    rewarm_fraction: float | None = None  # peak LR as a fraction of the parent's (None: optimizer.lr)
    carry: bool = False  # continue the parent's schedule position instead of starting at step 0


@dataclass(frozen=True)
class CheckpointConfig(_Frozen):
    every: int = 500  # steps; 0 disables periodic saves (a final and a preemption save still happen)
    keep: int = 3  # the newest N checkpoints...
    keep_every: int = 0  # ...plus every checkpoint at a multiple of this many steps (0: none)
    async_save: bool = True


@dataclass(frozen=True)
class TaskConfig(_Frozen):
    """A capability task (lmadapt.eval.tasks): a local JSONL file of multiple-choice or generation examples."""

    name: str = ""
    path: str = ""
    format: Literal["multiple_choice", "generate"] = "multiple_choice"
    num_fewshot: int = 0
    fewshot_path: str | None = None  # the task's train split for few-shot examples (None: the file itself)
    seed: int = 1234  # which few-shot examples: the same prompts for every version
    max_new_tokens: int = 32  # generate
    stop: tuple[str, ...] = ("\n",)  # generate: the answer ends at the first of these
    max_examples: int | None = None


@dataclass(frozen=True)
class EvalConfig(_Frozen):
    every: int = 500  # steps; 0 disables
    batches: int = 4
    tasks: tuple[TaskConfig, ...] = ()  # scored with the held-out loss every `every` steps, and by eval.py


@dataclass(frozen=True)
class LoggingConfig(_Frozen):
    every: int = 10  # steps between metric fetches (the only host sync in the loop)
    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class RunConfig(_Frozen):
    dir: str = "runs/default"
    seed: int = 0


@dataclass(frozen=True)
class InitConfig(_Frozen):
    """Where a run's params start: fresh (both null), a lineage version, or a Hugging Face directory."""

    from_version: str | None = None
    from_hf: str | None = None


@dataclass(frozen=True)
class LineageConfig(_Frozen):
    """`dir`: the lineage that `init.from_version` reads and a finished run publishes into (null: no publish)."""

    dir: str | None = None
    save_opt_state: bool = False  # also publish the optimizer state (for optimizer.carry_state in a child)


@dataclass(frozen=True)
class VersionConfig(_Frozen):
    """The version a finished run publishes: `id` (null: generated from the time and run) and a note."""

    id: str | None = None
    note: str = ""


@dataclass(frozen=True)
class StageConfig(_Frozen):
    """One stage of a staged run: a version name and the overrides that make its config."""

    name: str = ""
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config(_Frozen):
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
    stages: tuple[StageConfig, ...] = ()  # a staged run (see lmadapt.stages)
