"""Hugging Face interchange, per family: logits and greedy decoding match transformers, export round-trips to
identical tensors (one file or shards + index), streaming loads onto shardings read only their slices, errors.

Each family's random transformers model is built offline from a config shaped like a real checkpoint's (every
option those checkpoints use, dimensions shrunk), with norm weights and biases perturbed away from their init so
a wrong norm or bias mapping shows. Logit comparisons are float32 on CPU with an absolute tolerance of 1e-4
(logits here are O(1)-O(10)).
"""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import linen as nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from lmadapt import sharding  # noqa: E402
from lmadapt.config import MeshConfig, ModelConfig  # noqa: E402
from lmadapt.hf import (  # noqa: E402
    HFError,
    config_from_hf,
    config_to_hf,
    export_hf,
    from_hf,
    import_hf,
    load_safetensors_dump,
    open_hf,
    read_hf_state,
    save_safetensors_dump,
    to_hf,
)
from lmadapt.model import Transformer, init_params, stack_layers  # noqa: E402

ATOL = 1e-4
SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2}
# Shaped like Llama-3.2-1B, Mistral-7B-v0.1, Qwen2.5-0.5B, Qwen3-0.6B, gemma-2-2b and gpt2 (sizes shrunk).
HF_CONFIGS = {
    "llama": {**SMALL, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
              "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"},
    "mistral": {**SMALL, "sliding_window": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "tie_word_embeddings": False},
    "qwen2": {**SMALL, "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
              "sliding_window": 32768, "max_window_layers": 2, "rms_norm_eps": 1e-6},
    "qwen3": {**SMALL, "head_dim": 32, "rope_theta": 1000000.0, "tie_word_embeddings": True, "attention_bias": False,
              "use_sliding_window": False, "sliding_window": None, "rope_scaling": None},
    "gemma2": {**SMALL, "head_dim": 24, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh",
               "tie_word_embeddings": True, "rms_norm_eps": 1e-6},
    "gpt2": {"vocab_size": 301, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
             "initializer_range": 0.2},
}
FAMILIES = sorted(HF_CONFIGS)
WINDOWED = ("mistral", "gemma2")


def build_hf_model(family: str, seed: int = 0):
    """A random transformers model built offline; norms and biases perturbed so their mapping is exercised."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **copy.deepcopy(HF_CONFIGS[family]))  # it edits dicts
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory):
    """(family, directory, torch model) of a random transformers model saved as safetensors."""
    model = build_hf_model(request.param)
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(str(directory), safe_serialization=True)
    return request.param, directory, model


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def lm_logits(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None) -> np.ndarray:
    fn = jax.jit(lambda p, t, pos, seg: Transformer(cfg).apply({"params": p}, t, positions=pos, segment_ids=seg))
    return np.asarray(fn(params, tokens, positions, segment_ids))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_import_matches_transformers_packed_and_unpacked(hf_dir):
    """Row 0 packs two documents (segment ids, restarting positions); row 1 is one document. Each document's
    logits equal transformers' on that document alone."""
    family, directory, model = hf_dir
    ckpt = open_hf(str(directory))
    cfg = ckpt.config
    assert cfg.family == family and cfg.param_dtype == "float32" and ckpt.tokenizer is None
    if family in WINDOWED:
        assert cfg.sliding_window == 8 and cfg.global_layer_every == (2 if family == "gemma2" else 0)
    params = ckpt.load()
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, cfg.vocab_size, n) for n in (10, 14, 24))
    tokens = np.stack([np.concatenate([a, b]), c]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(10), np.arange(14)]), np.arange(24)]).astype(np.int32)
    segments = np.stack([[1] * 10 + [2] * 14, [1] * 24]).astype(np.int32)
    got = lm_logits(cfg, params, tokens, positions, segments)
    expected = [torch_logits(model, doc[None])[0] for doc in (a, b, c)]
    assert np.abs(expected[2]).max() > 1  # far from trivially small logits
    pairs = [(got[0, :10], expected[0]), (got[0, 10:], expected[1]), (got[1], expected[2])]
    print(f"{family}: import max |logit diff| = {max(max_diff(x, y) for x, y in pairs):.2e}")
    for x, y in pairs:
        np.testing.assert_allclose(x, y, rtol=0, atol=ATOL)


def test_greedy_decode_matches_transformers_generate(hf_dir):
    """KV-cached greedy decoding, 20 new tokens (past the sliding window of 8 for mistral and gemma2)."""
    from lmadapt.generate import generate

    family, directory, model = hf_dir
    ckpt = open_hf(str(directory))
    prompt = np.random.default_rng(2).integers(0, ckpt.config.vocab_size, (2, 6)).astype(np.int32)
    ours = np.asarray(generate(Transformer(ckpt.config), ckpt.load(), prompt, 20, rng=jax.random.key(0)))
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=20, min_new_tokens=20,
                                do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    assert theirs.shape == (2, 26)
    np.testing.assert_array_equal(ours, theirs)


def test_export_round_trip_is_identical_and_loads(hf_dir, tmp_path):
    """Import then export gives back the checkpoint's tensors bit for bit, a config.json that imports to the
    same ModelConfig, and a directory transformers loads with the original logits."""
    family, directory, model = hf_dir
    ckpt = open_hf(str(directory))
    out = export_hf(tmp_path / "again", ckpt.load(), ckpt.config)
    original, again = read_hf_state(str(directory)), load_file(os.path.join(out, "model.safetensors"))
    if ckpt.config.tie_embeddings:
        original.pop("lm_head.weight", None)
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and np.array_equal(again[name], tensor), name
    assert open_hf(out).config == ckpt.config
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == model.config.architectures
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = np.random.default_rng(3).integers(0, ckpt.config.vocab_size, (1, 20))
    np.testing.assert_allclose(torch_logits(loaded, tokens), torch_logits(model, tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_export_with_index_loads(family, tmp_path):
    """Above max_shard_bytes the export is model-0000i-of-0000N.safetensors + index; transformers, safetensors
    and lmadapt all read it back unchanged."""
    model = build_hf_model(family)
    params, cfg = from_hf({k: v.numpy() for k, v in model.state_dict().items()}, model.config.to_dict())
    out = export_hf(tmp_path / "sharded", params, cfg, max_shard_bytes=40_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(os.listdir(out)) == sorted([*shards, "model.safetensors.index.json", "config.json"])
    total = 0
    for shard in shards:
        assert os.path.getsize(os.path.join(out, shard)) < 40_000 + 70_000  # one tensor may exceed the limit
        with safe_open(os.path.join(out, shard), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                assert index["weight_map"][name] == shard
                total += f.get_tensor(name).nbytes
    assert total == index["metadata"]["total_size"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 16))
    np.testing.assert_allclose(torch_logits(loaded, tokens), torch_logits(model, tokens), rtol=0, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, import_hf(out)[0], params)
    model.save_pretrained(str(tmp_path / "theirs"), safe_serialization=True, max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "theirs" / "model.safetensors.index.json")
    jax.tree.map(np.testing.assert_array_equal, import_hf(str(tmp_path / "theirs"))[0], params)


def _target(cfg: ModelConfig, mesh, rules):
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_load_onto_shardings_reads_only_each_shard(family, tmp_path, monkeypatch):
    """`load(target)` on a data=2 x fsdp=2 x tensor=2 mesh, per-layer and scan layouts: the same values as the host
    load, in the target's dtype and shardings, and the bytes read from disk are about the model's (each distinct
    shard once), not once per device."""
    import lmadapt.hf.checkpoint as checkpoint

    model = build_hf_model(family)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    ckpt = open_hf(str(tmp_path / "hf"))
    host = ckpt.load()
    mesh, rules = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), MeshConfig().rules
    read = []
    real = checkpoint.read_tensor
    monkeypatch.setattr(checkpoint, "read_tensor", lambda info, index=(): read.append(real(info, index).nbytes)
                        or real(info, index))
    for scan in (False, True):
        cfg = ModelConfig(**{**ckpt.config.__dict__, "scan_layers": scan})
        target = _target(cfg, mesh, rules)
        read.clear()
        placed = ckpt.load(target)
        expected = stack_layers(host) if scan else host
        for (path, leaf), want, t in zip(jax.tree_util.tree_leaves_with_path(placed), jax.tree.leaves(expected),
                                         jax.tree.leaves(target), strict=True):
            assert leaf.sharding == t.sharding and leaf.dtype == t.dtype, path
            np.testing.assert_array_equal(np.asarray(leaf), want)
        model_bytes = sum(x.nbytes for x in jax.tree.leaves(host))
        # Replicated leaves are read once, sharded ones once per distinct shard; the data axis repeats every
        # shard on two devices, which the one-leaf cache serves. GPT-2's fused c_attn is read per q/k/v part.
        assert sum(read) <= 1.25 * model_bytes, (scan, sum(read), model_bytes)


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    """A bf16 checkpoint imports as bf16 params (param_dtype bfloat16) and re-exports bit-exactly; transformers
    upcasting the stored values matches lmadapt on the same values."""
    model = build_hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    ckpt = open_hf(str(tmp_path / "bf16"))
    assert ckpt.config.param_dtype == "bfloat16"
    params = ckpt.load()
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    again, config = to_hf(params, ckpt.config, "bfloat16")
    assert config["dtype"] == "bfloat16"
    for name, tensor in read_hf_state(str(tmp_path / "bf16")).items():
        if name in again:
            assert np.array_equal(again[name].view(np.uint16), tensor.view(np.uint16)), name
    out = export_hf(tmp_path / "out", params, ckpt.config, dtype="float32")
    tokens = np.random.default_rng(5).integers(0, 300, (1, 16)).astype(np.int32)
    upcast = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    f32 = jax.tree.map(lambda x: x.astype(np.float32), params)
    cfg32 = ModelConfig(**{**ckpt.config.__dict__, "param_dtype": "float32"})
    np.testing.assert_allclose(torch_logits(upcast, tokens), lm_logits(cfg32, f32, tokens), rtol=0, atol=ATOL)



def test_update_of_a_bfloat16_import_trains_in_the_runs_param_dtype(tmp_path):
    """import-hf of a bf16 checkpoint (Qwen2.5, Llama 3.2 ship bf16) keeps bf16 in the lineage; a run from that
    version with float32 master weights (the default model.param_dtype) loads it cast, on its shardings and in
    either layout, instead of refusing the dtype; a distillation teacher stored in bf16 likewise."""
    from lmadapt.config import load_config
    from lmadapt.continual import strategy
    from lmadapt.continual.distill import Ref
    from lmadapt.data.tokenizers import ByteTokenizer
    from lmadapt.lineage.origin import import_root, resolve_origin
    from lmadapt.lineage.store import Lineage

    build_hf_model("qwen2").to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    ckpt = open_hf(str(tmp_path / "bf16"))
    host = ckpt.load()
    import_root(Lineage(str(tmp_path / "lin")), str(tmp_path / "bf16"), host, ckpt.config, ByteTokenizer(),
                version_id="base")
    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
    mesh, rules = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), MeshConfig().rules
    for scan in (False, True):
        cfg = load_config(tiny, [f"lineage.dir={tmp_path / 'lin'}", "init.from_version=base", "train.seq_len=32",
                                 f"model.scan_layers={str(scan).lower()}", "continual.distill.weight=0.5",
                                 "continual.distill.teacher=base"])
        origin = resolve_origin(cfg)
        assert origin.cfg.model.param_dtype == "float32"
        target = _target(origin.cfg.model, mesh, rules)
        placed = origin.load_params(target)
        distill = strategy.build(origin.cfg, origin).token_terms[0]
        teacher = distill.load_ref(origin, placed, Ref(teacher=target)).teacher
        expected = stack_layers(host) if scan else host
        for got in (placed, teacher):
            for leaf, want, t in zip(jax.tree.leaves(got), jax.tree.leaves(expected), jax.tree.leaves(target),
                                     strict=True):
                assert leaf.dtype == np.float32 and leaf.sharding == t.sharding
                np.testing.assert_array_equal(np.asarray(leaf), want.astype(np.float32))

def test_float32_export_as_bfloat16_rounds_like_torch(tmp_path):
    model = build_hf_model("llama")
    params, cfg = from_hf({k: v.numpy() for k, v in model.state_dict().items()}, model.config.to_dict())
    state, _ = to_hf(params, cfg, "bfloat16")
    out = export_hf(tmp_path / "bf16", params, cfg, dtype="bfloat16")
    stored = load_file(os.path.join(out, "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in stored:
            torch_bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(stored[name].view(np.uint16), torch_bits), name
            assert np.array_equal(state[name].view(np.uint16), torch_bits), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scan_layers_export_identically(family):
    model = build_hf_model(family)
    params, cfg = from_hf({k: v.numpy() for k, v in model.state_dict().items()}, model.config.to_dict())
    scanned_cfg = ModelConfig(**{**cfg.__dict__, "scan_layers": True})
    flat_state, flat_config = to_hf(params, cfg)
    scan_state, scan_config = to_hf(stack_layers(params), scanned_cfg)
    assert flat_config == scan_config and sorted(flat_state) == sorted(scan_state)
    for name in flat_state:
        assert np.array_equal(flat_state[name], scan_state[name]), name
    back, _ = from_hf(scan_state, scan_config)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_original_gpt2_names_and_buffers():
    """The original GPT-2 files name tensors without `transformer.` and carry causal-mask buffers."""
    model = build_hf_model("gpt2")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params, cfg = from_hf(state, model.config.to_dict())
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
    legacy["lm_head.weight"] = state["transformer.wte.weight"]  # tied: ignored
    back, cfg2 = from_hf(legacy, model.config.to_dict())
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0},
    {"type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64, "attention_factor": 0.9,
     "truncate": False},
])
def test_rope_scaling_round_trips_and_gives_transformers_frequencies(rope):
    """rope_scaling (old name) or rope_parameters (transformers 5) -> RopeScalingConfig -> config.json: the same
    ModelConfig again, and transformers computes the frequencies lmadapt's RoPE uses."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmadapt.rope import static_frequencies

    base = {**HF_CONFIGS["llama"], "model_type": "llama", "rope_theta": 20000.0}
    for key in ("rope_scaling", "rope_parameters"):
        hf = {**{k: v for k, v in base.items() if k != "rope_scaling"}, key: dict(rope)}
        cfg = config_from_hf(hf)
        assert cfg.rope_scaling.type == rope.get("rope_type", rope.get("type")) and cfg.rope_theta == 20000.0
        exported = config_to_hf(cfg)
        assert config_from_hf(exported) == cfg
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in exported.items() if k != "model_type"})
        inv_freq, factor = ROPE_INIT_FUNCTIONS[cfg.rope_scaling.type](hf_cfg, None)
        ours, our_factor = static_frequencies(cfg)
        np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
        assert our_factor == pytest.approx(factor)


def test_every_family_exports_a_config_transformers_builds():
    """config_to_hf of each imported config builds the family's class with the same options (strict typing in
    transformers 5 included), and imports back to the same ModelConfig."""
    for family, options in HF_CONFIGS.items():
        cfg = config_from_hf({**options, "model_type": family})
        exported = config_to_hf(cfg, bos_id=1, eos_id=2)
        rebuilt = transformers.AutoConfig.for_model(family, **{k: v for k, v in exported.items()
                                                               if k != "model_type"})
        assert rebuilt.architectures == exported["architectures"]
        assert config_from_hf(rebuilt.to_dict()) == cfg, family
        assert config_from_hf(exported) == cfg, family



@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_absent_special_ids_are_null_not_the_class_default(family):
    """A tokenizer without a BOS (Qwen / Llama-3-style byte-level BPE): config.json says bos_token_id null, so
    transformers does not fill in its class default (Llama 1, Gemma 2's 2, GPT-2's 50256 outside a small vocab)."""
    cfg = config_from_hf({**HF_CONFIGS[family], "model_type": family})
    exported = config_to_hf(cfg, eos_id=0)
    rebuilt = transformers.AutoConfig.for_model(family, **{k: v for k, v in exported.items() if k != "model_type"})
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id, rebuilt.pad_token_id) == (None, 0, None)

def test_safetensors_dump_round_trip(tmp_path):
    params, _ = from_hf(*to_hf_state("gpt2"))
    params["layers_1"] = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params["layers_1"])  # mixed dtypes
    for name, tree in (("flat", params), ("scanned", stack_layers({**params, "layers_1": params["layers_0"]}))):
        path = save_safetensors_dump(str(tmp_path / f"{name}.safetensors"), tree)
        loaded = load_safetensors_dump(path)
        assert jax.tree.structure(loaded) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert "layers_0/attn/q/kernel" in load_file(str(tmp_path / "flat.safetensors"))


def to_hf_state(family: str):
    model = build_hf_model(family)
    return {k: v.numpy() for k, v in model.state_dict().items()}, model.config.to_dict()


def test_tokenizer_travels_with_the_export(tmp_path):
    """A trained tokenizer is exported as tokenizer.json (+ its own file) and comes back from open_hf; the
    special ids land in config.json and generation_config.json."""
    from lmadapt.data.tokenizers import ByteTokenizer, train_bpe

    params, cfg = from_hf(*to_hf_state("qwen2"))
    tok = train_bpe(["def f(x):\n    return x  +  1\n\nprint(f(2))\n" * 50, "some text to learn from " * 50], 280)
    out = export_hf(tmp_path / "hf", params, cfg, tokenizer=tok)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["eos_token_id"] == tok.eos_id
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    ckpt = open_hf(out)
    assert ckpt.tokenizer.fingerprint == tok.fingerprint and ckpt.require_tokenizer() is ckpt.tokenizer
    export_hf(tmp_path / "bytes", params, cfg, tokenizer=ByteTokenizer())
    assert isinstance(open_hf(str(tmp_path / "bytes")).tokenizer, ByteTokenizer)
    small = ModelConfig(**{**cfg.__dict__, "vocab_size": 250})
    with pytest.raises(HFError, match="the tokenizer has 259 tokens but model.vocab_size=250"):
        export_hf(tmp_path / "small", {**params, "embed": {"embedding": params["embed"]["embedding"][:250]}},
                  small, tokenizer=ByteTokenizer())


REFUSED = [  # (family, config.json change, the key the error names)
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"sliding_window": 4096}, "sliding_window"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type"),
    ("mistral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "mrope_section": [1]}},
     "rope_parameters.mrope_section"),
    ("llama", {"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ("llama", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("mistral", {"hidden_act": "relu"}, "hidden_act"),
    ("mistral", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma2", {"attention_bias": True}, "attention_bias"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
]


@pytest.mark.parametrize(("family", "change", "key"), REFUSED)
def test_unimplemented_options_are_refused_by_name(family, change, key):
    hf = {**HF_CONFIGS[family], "model_type": family, **change}
    with pytest.raises(HFError, match=rf"^config\.json: {key}=.* is not supported \(expected .*\)$"):
        config_from_hf(hf)


def test_class_defaults_and_explicit_nulls():
    """Missing keys take the transformers class's defaults (Mistral's window 4096, Gemma 2's softcaps and tied
    embeddings); an explicit null switches a window or softcap off."""
    mistral = {k: v for k, v in HF_CONFIGS["mistral"].items() if k != "sliding_window"}
    assert config_from_hf({**mistral, "model_type": "mistral"}).sliding_window == 4096
    assert config_from_hf({**mistral, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    gemma = {k: v for k, v in HF_CONFIGS["gemma2"].items()
             if k not in ("attn_logit_softcapping", "tie_word_embeddings", "head_dim")}
    cfg = config_from_hf({**gemma, "model_type": "gemma2"})
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.tie_embeddings, cfg.dim_per_head) == (50.0, 30.0, True, 256)
    assert config_from_hf({**gemma, "model_type": "gemma2", "final_logit_softcapping": None}).final_softcap is None
    qwen3 = {k: v for k, v in HF_CONFIGS["qwen3"].items() if k != "head_dim"}
    assert config_from_hf({**qwen3, "model_type": "qwen3"}).dim_per_head == 128


def test_an_export_removes_what_a_killed_export_left(tmp_path):
    import socket
    import subprocess
    import sys

    from lmadapt.hf.common import make_staging_dir

    state, config = to_hf_state("llama")
    params, cfg = from_hf(state, config)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:64]
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-abc"  # as a SIGKILLed export leaves it
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = make_staging_dir(str(tmp_path / "out"))  # this process's, still writing
    export_hf(str(tmp_path / "out"), params, cfg)
    assert not stale.exists() and os.path.isdir(live)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "out"])


def test_errors(tmp_path):
    state, config = to_hf_state("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(HFError, match="only safetensors"):
        import_hf(str(pickled))
    with pytest.raises(HFError, match="model_type 'mixtral' is not supported"):
        from_hf(state, {**config, "model_type": "mixtral"})
    with pytest.raises(HFError, match="architectures"):
        from_hf(state, {**config, "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(HFError, match="missing 'hidden_size'"):
        from_hf(state, {k: v for k, v in config.items() if k != "hidden_size"})
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(HFError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf(missing, config)
    wrong = {**state, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 48), np.float32)}
    with pytest.raises(HFError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(64, 48\), expected "
                                      r"\(32, 64\)"):
        from_hf(wrong, config)
    with pytest.raises(HFError, match=r"unexpected tensor\(s\) model\.extra"):
        from_hf({**state, "model.extra": np.zeros(3, np.float32)}, config)
    params, cfg = from_hf(state, config)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(HFError, match="refusing to overwrite"):
        export_hf(busy, params, cfg)
    assert os.listdir(busy) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["busy", "pickled"]
    with pytest.raises(HFError, match="export dtype"):
        to_hf(params, cfg, "float16")
    with pytest.raises(HFError, match="model.attn_softcap=50.0 cannot be exported as a llama checkpoint"):
        to_hf(params, ModelConfig(**{**cfg.__dict__, "attn_softcap": 50.0}))


TWO_PROCESS_SCRIPT = """
import os, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from flax import linen as nn
import lmadapt.hf.checkpoint as checkpoint
from lmadapt import sharding
from lmadapt.config import MeshConfig
from lmadapt.hf import export_hf, open_hf
from lmadapt.model import init_params

ckpt = open_hf(sys.argv[3])
read = []
real = checkpoint.read_tensor
checkpoint.read_tensor = lambda info, index=(): read.append(real(info, index).nbytes) or real(info, index)
mesh, rules = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)), MeshConfig().rules
boxed = jax.eval_shape(lambda: init_params(ckpt.config, jax.random.key(0)))
target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                      sharding.tree_shardings(boxed, mesh, rules))
params = ckpt.load(target)
checkpoint.read_tensor = real
host = ckpt.load()
for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(host), strict=True):
    assert not leaf.is_fully_addressable
    for shard in leaf.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
print("read", sum(read), "of", sum(x.nbytes for x in jax.tree.leaves(host)), flush=True)
export_hf(sys.argv[4], params, ckpt.config, max_shard_bytes=60_000)
print("exported", flush=True)
"""


def test_two_processes_read_their_own_shards_and_export(tmp_path):
    """jax.distributed with 2 processes x 4 CPU devices, fsdp over all 8: each process reads about half the
    model from disk (its devices' slices), and the export gathers across processes and is written once."""
    import socket
    import subprocess
    import sys

    directory = tmp_path / "hf"
    build_hf_model("llama").save_pretrained(str(directory), safe_serialization=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(directory), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        got, total = map(int, stdout.split("read ")[1].split()[0:3:2])
        assert got <= 0.6 * total, (got, total)  # half the sharded leaves, all of the (small) replicated ones
    original = read_hf_state(str(directory))
    original.pop("lm_head.weight", None)
    assert read_hf_state(str(out)).keys() == original.keys()
    for name, tensor in read_hf_state(str(out)).items():
        assert np.array_equal(tensor, original[name]), name
