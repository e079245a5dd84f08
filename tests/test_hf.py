"""Hugging Face interchange: logits match transformers both ways, exact re-export, bf16, scan layout, errors.

Logit comparisons are float32 on CPU with an absolute tolerance of 1e-4 (logits here are O(1)-O(10)).
"""

import json
import lzma
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from lmadapt.config import ModelConfig  # noqa: E402
from lmadapt.hf import (  # noqa: E402
    HFError,
    export_hf,
    from_hf,
    import_hf,
    load_safetensors_dump,
    save_safetensors_dump,
    to_hf,
)
from lmadapt.model import Transformer, init_params, stack_layers  # noqa: E402
from lmadapt.tokenizer import ByteTokenizer, train_sentencepiece  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4

CONFIGS = {
    # Grouped-query heads with head_dim * n_heads != d_model, a vocab that is no multiple of anything, non-default
    # theta and eps: every config field that reaches the math differs from its default.
    "llama-untied": ModelConfig(family="llama", vocab_size=301, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=16, d_ff=80, max_seq_len=64, rope_theta=500.0, norm_eps=1e-6, init_std=0.2),
    "llama-tied": ModelConfig(family="llama", vocab_size=250, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=16, d_ff=80, max_seq_len=64, tie_embeddings=True, init_std=0.2),
    "gpt2": ModelConfig(family="gpt2", vocab_size=301, d_model=48, n_layers=2, n_heads=4, d_ff=192, max_seq_len=64,
                        tie_embeddings=True, init_std=0.2),
}


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Params of the model's shapes with every leaf random (biases and norm scales too, so a mix-up shows)."""
    shapes = jax.eval_shape(lambda: jax.tree.map(lambda b: b.value, init_params(cfg, jax.random.key(0)),
                                                 is_leaf=lambda x: hasattr(x, "value")))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    values = []
    for path, leaf in leaves:
        noise = rng.normal(0, cfg.init_std, leaf.shape).astype(np.float32)
        values.append(1 + noise / 2 if path[-1].key == "scale" else noise)
    return jax.tree.unflatten(treedef, values)


def tokens_for(cfg: ModelConfig, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)


def lm_logits(cfg: ModelConfig, params, tokens) -> np.ndarray:
    return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens))


def hf_logits(directory, tokens, dtype=torch.float32) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_matches_transformers(tmp_path, name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    tokens = tokens_for(cfg)
    out = export_hf(tmp_path / "hf", params, cfg, bos_id=1, eos_id=2)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[cfg.family]]
    expected = lm_logits(cfg, params, tokens)
    got = hf_logits(out, tokens)
    assert np.abs(expected).max() > 1  # far from trivially small logits
    print(f"{name}: export max |logit diff| = {max_diff(got, expected):.2e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def hf_model(family: str, seed: int = 0):
    """A random transformers model built offline; norms and biases perturbed so their mapping is exercised."""
    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=2000.0,
                                          initializer_range=0.2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=301, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                         initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_dir(request, tmp_path_factory):
    """(family, directory, model) of a random transformers model saved as safetensors."""
    model = hf_model(request.param)
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(str(directory), safe_serialization=True)
    return request.param, directory, model


def test_import_matches_transformers(hf_dir):
    family, directory, model = hf_dir
    params, cfg, tokenizer = import_hf(str(directory))
    assert cfg.family == family and tokenizer is None and cfg.param_dtype == "float32"
    tokens = tokens_for(cfg)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    got = lm_logits(cfg, params, tokens)
    assert np.abs(expected).max() > 1
    print(f"{family}: import max |logit diff| = {max_diff(got, expected):.2e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_reexport_is_bit_exact(hf_dir, tmp_path):
    _, directory, _ = hf_dir
    params, cfg, _ = import_hf(str(directory))
    export_hf(tmp_path / "again", params, cfg)
    original, again = load_file(str(directory / "model.safetensors")), load_file(str(tmp_path / "again" /
                                                                                     "model.safetensors"))
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and np.array_equal(again[name], tensor), name


def test_bfloat16_export(tmp_path):
    cfg = CONFIGS["llama-untied"]
    params = random_params(cfg)
    export_hf(tmp_path / "bf16", params, cfg, dtype="bfloat16")
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {np.dtype(ml_dtypes.bfloat16)}
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    tokens = tokens_for(cfg)
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    # The stored bf16 values are exactly ours: transformers upcasting them to float32 matches to float32 precision.
    np.testing.assert_allclose(hf_logits(tmp_path / "bf16", tokens), lm_logits(cfg, rounded, tokens), atol=ATOL)
    # Computing in bfloat16 end to end (transformers' own bf16 path) is only close.
    expected = lm_logits(cfg, params, tokens)
    got = hf_logits(tmp_path / "bf16", tokens, dtype=torch.bfloat16)
    scale = float(np.abs(expected).max())
    print(f"bf16: max |logit diff| = {max_diff(got, expected):.2e} (max |logit| {scale:.1f})")
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.05 * scale)
    # Import gives the bf16 values exactly (as float32), and exporting them as bf16 again is bit-exact.
    imported, _, _ = import_hf(str(tmp_path / "bf16"))
    jax.tree.map(np.testing.assert_array_equal, imported, rounded)
    again, _ = to_hf(imported, cfg, "bfloat16")
    for name, tensor in state.items():
        assert np.array_equal(again[name].view(np.uint16), tensor.view(np.uint16)), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scan_layers_export_identically(family):
    cfg = CONFIGS["llama-untied" if family == "llama" else "gpt2"]
    params = random_params(cfg)
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
    cfg = CONFIGS["gpt2"]
    params = random_params(cfg)
    state, config = to_hf(params, cfg)
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    legacy["lm_head.weight"] = state["transformer.wte.weight"]  # tied: ignored
    back, cfg2 = from_hf(legacy, config)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_safetensors_dump_round_trip(tmp_path):
    params = random_params(CONFIGS["gpt2"])
    params["layers_1"] = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params["layers_1"])  # mixed dtypes
    for name, tree in (("flat", params), ("scanned", stack_layers({**params, "layers_1": params["layers_0"]}))):
        path = save_safetensors_dump(str(tmp_path / f"{name}.safetensors"), tree)
        loaded = load_safetensors_dump(path)
        assert jax.tree.structure(loaded) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert "layers_0/attn/q/kernel" in load_file(str(tmp_path / "flat.safetensors"))
    save_safetensors_dump(str(tmp_path / "bf.safetensors"), params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(load_safetensors_dump(str(tmp_path / "bf.safetensors")))} == {
        np.dtype(ml_dtypes.bfloat16)}


def test_sharded_checkpoint_and_tokenizer(tmp_path):
    cfg = CONFIGS["llama-tied"]
    params = random_params(cfg)
    with lzma.open(os.path.join(ROOT, "data", "shakespeare.txt.xz"), "rt", encoding="utf-8") as f:
        text = f.read(30_000)
    tok = train_sentencepiece([text], 250, byte_fallback=False)
    out = export_hf(tmp_path / "hf", params, cfg, tokenizer=tok)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    # Re-shard by hand as save_pretrained does for big models: two files and an index.
    state = load_file(os.path.join(out, "model.safetensors"))
    os.remove(os.path.join(out, "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, os.path.join(out, shard), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}, f)
    imported, cfg2, tok2 = import_hf(out)
    assert tok2.fingerprint == tok.fingerprint and cfg2.tie_embeddings and cfg2.vocab_size == 250
    jax.tree.map(np.testing.assert_array_equal, imported, params)
    np.testing.assert_allclose(hf_logits(out, tokens_for(cfg)), lm_logits(cfg, params, tokens_for(cfg)), atol=ATOL)
    # The byte tokenizer has no transformers equivalent; its marker travels so import gives it back.
    export_hf(tmp_path / "bytes", params, cfg, tokenizer=ByteTokenizer())
    assert isinstance(import_hf(str(tmp_path / "bytes"))[2], ByteTokenizer)


def test_errors(tmp_path):
    cfg = CONFIGS["llama-untied"]
    state, config = to_hf(random_params(cfg), cfg)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(HFError, match="only safetensors"):
        import_hf(str(pickled))

    with pytest.raises(HFError, match="model_type 'mistral' is not supported"):
        from_hf(state, {**config, "model_type": "mistral"})
    with pytest.raises(HFError, match="architectures"):
        from_hf(state, {**config, "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(HFError, match="missing 'hidden_size'"):
        from_hf(state, {k: v for k, v in config.items() if k != "hidden_size"})
    for key, value in (("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("attention_bias", True),
                       ("mlp_bias", True), ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4})):
        with pytest.raises(HFError, match=f"{key}=.* is not supported"):
            from_hf(state, {**config, key: value})

    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(HFError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf(missing, config)
    wrong = {**state, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 48), np.float32)}
    with pytest.raises(HFError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(64, 48\), expected "
                                      r"\(32, 48\)"):
        from_hf(wrong, config)
    with pytest.raises(HFError, match=r"unexpected tensor\(s\) model\.extra"):
        from_hf({**state, "model.extra": np.zeros(3, np.float32)}, config)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(HFError, match="refusing to overwrite"):
        export_hf(busy, random_params(cfg), cfg)
    assert os.listdir(busy) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["busy", "pickled"]
    with pytest.raises(HFError, match="export dtype"):
        to_hf(random_params(cfg), cfg, "float16")
