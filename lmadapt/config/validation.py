"""Cross-field checks of a loaded config, run once at the edge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmadapt.config.base import ConfigError, as_lists
from lmadapt.config.schema import _NAME_RE, _VERSION_RE, Config, MeshConfig, ModelConfig
from lmadapt.families import family

# --------------------------------------------------------------------------------------------------
# Validation: cross-field checks, once
# --------------------------------------------------------------------------------------------------


def validate(cfg: Config, origin: str = "<config>", *, models_from_versions: bool = False) -> None:
    """Check values and relations between them; raise ConfigError naming the first problem.

    A run that starts from a version or a Hugging Face directory takes that model's architecture (its
    max_seq_len is checked against train.seq_len once it is read), so the config's own model is not.
    """

    # Values held as tuples are passed through `as_lists`: a message shows the lists the user wrote.
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{origin}: key {key!r} has value {value!r}; expected {expected}")

    m = cfg.model
    _validate_model(m, need)

    t = cfg.train
    need(t.steps > 0, "train.steps", t.steps, "a positive integer")
    need(t.batch_size > 0, "train.batch_size", t.batch_size, "a positive integer")
    need(t.seq_len > 0, "train.seq_len", t.seq_len, "a positive integer")
    own_model = not (models_from_versions or cfg.init.from_version or cfg.init.from_hf)
    need(not own_model or t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len,
         f"at most model.max_seq_len={m.max_seq_len}")
    need(t.microbatches > 0, "train.microbatches", t.microbatches, "a positive integer")
    need(t.max_nonfinite_in_a_row >= 0, "train.max_nonfinite_in_a_row", t.max_nonfinite_in_a_row,
         "a non-negative integer")
    need(t.batch_size % t.microbatches == 0, "train.microbatches", t.microbatches,
         f"a divisor of train.batch_size={t.batch_size}")

    _validate_mesh(cfg.mesh, need)

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
    _check_schedule_levers(cfg, need)

    need(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "an integer >= 0")
    need(cfg.checkpoint.keep > 0, "checkpoint.keep", cfg.checkpoint.keep, "a positive integer")
    need(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", cfg.checkpoint.keep_every, "an integer >= 0")
    need(cfg.eval.every >= 0, "eval.every", cfg.eval.every, "an integer >= 0")
    need(cfg.eval.batches > 0, "eval.batches", cfg.eval.batches, "a positive integer")
    names = [t.name for t in cfg.eval.tasks]
    for i, t in enumerate(cfg.eval.tasks):
        need(bool(_NAME_RE.fullmatch(t.name)) and names.count(t.name) == 1, f"eval.tasks.{i}.name", t.name,
             "a unique name of letters, digits, '_', '-' or '.'")
        need(bool(t.path), f"eval.tasks.{i}.path", t.path, "the task's JSONL file")
        need(t.num_fewshot >= 0, f"eval.tasks.{i}.num_fewshot", t.num_fewshot, "an integer >= 0")
        need(t.max_new_tokens > 0, f"eval.tasks.{i}.max_new_tokens", t.max_new_tokens, "a positive integer")
        need(t.max_examples is None or t.max_examples > 0, f"eval.tasks.{i}.max_examples", t.max_examples,
             "a positive integer or null")
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
    _check_average(cfg, need)
    _check_budget(cfg, need)
    for i, stage in enumerate(cfg.stages):
        need(_VERSION_RE.fullmatch(stage.name) is not None, f"stages.{i}.name", stage.name, "a version id")
    need(not cfg.stages or cfg.lineage.dir is not None, "lineage.dir", cfg.lineage.dir,
         "a lineage directory: the stages publish their versions there")
    for key, vid in (("init.from_version", cfg.init.from_version), ("version.id", cfg.version.id)):
        need(vid is None or (_VERSION_RE.fullmatch(vid) is not None and ".." not in vid), key, vid,
             "a version id: letters, digits, '_', '-' or '.', no path separators or '..'")


def _check_schedule_levers(cfg: Config, need: Callable[[bool, str, Any, str], None]) -> None:
    """rewarm_fraction and carry read the parent version's schedule, so they need a run from a version."""
    s, parent = cfg.schedule, cfg.init.from_version
    need(s.rewarm_fraction is None or 0 < s.rewarm_fraction <= 10,
         "schedule.rewarm_fraction", s.rewarm_fraction, "a number in (0, 10] or null")
    need(s.rewarm_fraction is None or parent is not None, "schedule.rewarm_fraction", s.rewarm_fraction,
         "null unless init.from_version is set (it is a fraction of the parent version's peak learning rate)")
    need(not s.carry or parent is not None, "schedule.carry", s.carry,
         "false unless init.from_version is set (it continues the parent version's schedule)")


def _validate_model(m: ModelConfig, need: Callable[[bool, str, Any, str], None]) -> None:
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
    need(m.attention != "cudnn" or m.dtype != "float32", "model.attention", m.attention,
         "auto, xla or einsum with model.dtype=float32 (cuDNN's fused attention runs in bfloat16 only)")
    _validate_family_options(m, need)


def _validate_mesh(mesh: MeshConfig, need: Callable[[bool, str, Any, str], None]) -> None:
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    for name, v in sizes.items():
        need(v == -1 or v > 0, f"mesh.{name}", v, "a positive integer or -1 (all remaining devices)")
    need(sum(v == -1 for v in sizes.values()) <= 1, "mesh", sizes, "at most one axis set to -1")
    for i, rule in enumerate(mesh.rules):
        ok = (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)
              and (rule[1] is None or (isinstance(rule[1], str) and rule[1] in sizes)
                   or (isinstance(rule[1], tuple) and all(isinstance(a, str) and a in sizes for a in rule[1]))))
        need(ok, f"mesh.rules[{i}]", as_lists(rule), "[logical_name, mesh_axis | [mesh_axes] | null]")


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
        need(t in ("q", "k", "v", "o", "gate", "up", "down"), "continual.lora.targets", as_lists(c.lora.targets),
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
        need(bool(g.select), f"optimizer.groups.{i}.select", as_lists(g.select), "at least one selector")
        need(g.lr_scale >= 0, f"optimizer.groups.{i}.lr_scale", g.lr_scale, "a number >= 0")


def _check_average(cfg: Config, need: Callable[[bool, str, Any, str], None]) -> None:
    """continual.average: WiSE interpolates toward the parent version, so it needs one; the EMA decay < 1."""
    a = cfg.continual.average
    need(a.wise is None or 0 <= a.wise <= 1, "continual.average.wise", a.wise, "a number in [0, 1] or null")
    need(a.wise is None or cfg.init.from_version is not None, "continual.average.wise", a.wise,
         "null unless init.from_version names the parent version to average with")
    need(0 <= a.ema < 1, "continual.average.ema", a.ema, "a number in [0, 1) (0: no EMA)")
    # Under LoRA the EMA would average the frozen base too (a second copy of it for nothing).
    need(a.ema == 0 or cfg.continual.lora.rank == 0, "continual.average.ema", a.ema,
         "0 when continual.lora.rank > 0 (no EMA of LoRA adapters)")


def _check_budget(cfg: Config, need: Callable[[bool, str, Any, str], None]) -> None:
    """The replay levers (final_fraction, phases) and the forgetting budget, which moves the replay fraction
    at eval points against the parent's losses. Budget sources from the lineage are checked once known."""
    r, b = cfg.data.replay, cfg.continual.forgetting_budget
    need(r.final_fraction is None or 0 <= r.final_fraction < 1, "data.replay.final_fraction", r.final_fraction,
         "a number in [0, 1) or null")
    need(r.phases >= 2, "data.replay.phases", r.phases, "an integer >= 2 (the first at fraction, the last at "
         "final_fraction)")
    need(not r.final_fraction or bool(r.sources) or r.from_lineage, "data.replay.sources", as_lists(r.sources),
         "at least one source when data.replay.final_fraction > 0 (or data.replay.from_lineage=true)")
    if not b.sources:
        return
    key, names = "continual.forgetting_budget", [s.name for s in r.sources]
    need(cfg.init.from_version is not None, f"{key}.sources", as_lists(b.sources),
         "empty unless init.from_version is set (the budget is measured against the parent version's losses)")
    need(cfg.eval.every > 0, "eval.every", cfg.eval.every,
         f"a positive integer when {key}.sources is set (the budget decides at eval points)")
    need(bool(names) or r.from_lineage, "data.replay.sources", as_lists(r.sources),
         f"at least one source when {key}.sources is set (or data.replay.from_lineage=true)")
    for name in b.sources:
        need(r.from_lineage or name in names, f"{key}.sources", as_lists(b.sources),
             f"names of data.replay.sources ({', '.join(names)}), or data.replay.from_lineage=true")
    need(len(set(b.sources)) == len(b.sources), f"{key}.sources", as_lists(b.sources), "distinct source names")
    need(b.replay_step > 0, f"{key}.replay_step", b.replay_step, "a positive number")
    need(r.fraction <= b.max_fraction < 1, f"{key}.max_fraction", b.max_fraction,
         f"a number in [data.replay.fraction={r.fraction}, 1)")
    need(0 <= b.slack <= 1, f"{key}.slack", b.slack, "a number in [0, 1]")
    need(r.final_fraction is None, "data.replay.final_fraction", r.final_fraction,
         f"null when {key}.sources is set (the budget moves the fraction)")


def _validate_data(cfg: Config, need: Callable[[bool, str, Any, str], None]) -> None:
    d, tok = cfg.data, cfg.tokenizer
    need(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "a number in (0, 1)")
    need(d.max_document_bytes > 0, "data.max_document_bytes", d.max_document_bytes, "a positive integer")
    need(0 <= d.workers <= 1024, "data.workers", d.workers, "an integer in [0, 1024] (0: one per core)")
    need(d.shuffle_window >= 1, "data.shuffle_window", d.shuffle_window, "a positive number of documents")
    need(d.readers >= 1 and cfg.train.batch_size % d.readers == 0, "data.readers", d.readers,
         f"a positive divisor of train.batch_size={cfg.train.batch_size}")
    need(d.readers == 1 or bool(d.cache_dir), "data.readers", d.readers,
         "1 when data.cache_dir is empty (readers read the cached token shards of their files)")
    need(tok.kind != "bytes" or cfg.model.vocab_size >= 259, "model.vocab_size", cfg.model.vocab_size,
         "at least 259 for the byte tokenizer (256 bytes + bos, eos, pad)")
    need(tok.kind != "sentencepiece" or tok.path is not None or 16 <= tok.vocab_size <= cfg.model.vocab_size,
         "tokenizer.vocab_size", tok.vocab_size, f"between 16 and model.vocab_size={cfg.model.vocab_size}")
    floor = 259 + len(tok.user_defined_symbols)  # bos, eos, pad, the user symbols and 256 bytes
    need(tok.kind != "bpe" or tok.path is not None or floor <= tok.vocab_size <= cfg.model.vocab_size,
         "tokenizer.vocab_size", tok.vocab_size, f"between {floor} and model.vocab_size={cfg.model.vocab_size}")
    need(tok.kind != "hf" or bool(tok.path), "tokenizer.path", tok.path,
         "a tokenizer.json or a directory holding one for kind 'hf'")
    need(bool(d.sources), "data.sources", as_lists(d.sources), "at least one source")
    need(0 <= d.replay.fraction < 1, "data.replay.fraction", d.replay.fraction, "a number in [0, 1)")
    need(d.replay.fraction == 0 or bool(d.replay.sources) or d.replay.from_lineage, "data.replay.sources",
         as_lists(d.replay.sources),
         "at least one source when data.replay.fraction > 0 (or data.replay.from_lineage=true)")
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
                need(bool(src.labels), f"{key}.labels", as_lists(src.labels),
                     "the list of labels for format 'classification'")
                need("{text}" in src.template, f"{key}.template", src.template, "a template containing {text}")


def _validate_family_options(m: ModelConfig, need: Callable[[bool, str, Any, str], None]) -> None:
    """Options a family's blocks do not have are refused by name rather than silently ignored."""
    fam = family(m.family)
    need(m.sliding_window is None or fam.sliding_window, "model.sliding_window", m.sliding_window,
         f"null for the {m.family} family (sliding windows: mistral, gemma2)")
    need(m.sliding_window is None or m.sliding_window > 0, "model.sliding_window", m.sliding_window,
         "a positive integer or null")
    need(m.global_layer_every >= 0, "model.global_layer_every", m.global_layer_every, "a non-negative integer")
    for key in ("attn_softcap", "final_softcap"):
        value = getattr(m, key)
        need(value is None or fam.softcaps, f"model.{key}", value, f"null for the {m.family} family (gemma2 only)")
        need(value is None or value > 0, f"model.{key}", value, "a positive number or null")
    need(m.query_pre_attn_scalar is None or m.query_pre_attn_scalar > 0, "model.query_pre_attn_scalar",
         m.query_pre_attn_scalar, "a positive number or null")
    r = m.rope_scaling
    need(r.type == "default" or fam.rope, "model.rope_scaling.type", r.type,
         f"'default' for the {m.family} family (it has learned positions, not RoPE)")
    need(r.factor > 0, "model.rope_scaling.factor", r.factor, "a positive number")
    need(r.original_max_len is None or r.original_max_len > 0, "model.rope_scaling.original_max_len",
         r.original_max_len, "a positive integer or null")
    need(r.type != "llama3" or r.high_freq_factor > r.low_freq_factor > 0, "model.rope_scaling.high_freq_factor",
         r.high_freq_factor, f"above model.rope_scaling.low_freq_factor={r.low_freq_factor} (both positive)")
    need(r.type != "dynamic" or m.dim_per_head > 2, "model.head_dim", m.dim_per_head,
         "more than 2 for dynamic RoPE scaling")
    need(r.type != "yarn" or (r.beta_fast > 0 and r.beta_slow > 0), "model.rope_scaling.beta_fast",
         (r.beta_fast, r.beta_slow), "positive beta_fast and beta_slow")
