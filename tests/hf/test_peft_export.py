"""LoRA versions export a PEFT adapter: `PeftModel.from_pretrained(parent's HF export, OUT/adapter)` gives the logits
of the merged export (llama with an lm_head adapter, qwen2 with q/k/v biases); key names as peft itself saves them;
scan-stacked adapters convert identically; gpt2 is refused with one line and its merged export still written."""

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from lmadapt.config import ModelConfig  # noqa: E402
from lmadapt.continual.lora import TARGETS, init_lora, lora_scale, merge  # noqa: E402
from lmadapt.data.tokenizers import ByteTokenizer  # noqa: E402
from lmadapt.hf import HFError  # noqa: E402
from lmadapt.hf.peft import peft_state  # noqa: E402
from lmadapt.lineage.store import Lineage  # noqa: E402
from lmadapt.model import init_params, stack_layers  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
RANK, ALPHA = 4, 12.0  # scale 3: a wrong scale convention shows
SMALL = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, init_std=0.2)
CASES = {
    "llama": (ModelConfig(family="llama", **SMALL), (*TARGETS, "lm_head")),
    "qwen2": (ModelConfig(family="qwen2", tie_embeddings=True, **SMALL), TARGETS),
}
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj", "lm_head": "lm_head"}


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_params(cfg: ModelConfig) -> dict:
    """Every leaf random (biases included, norm scales near 1)."""
    shapes = jax.eval_shape(lambda: jax.tree.map(lambda b: b.value, init_params(cfg, jax.random.key(0)),
                                                 is_leaf=lambda x: hasattr(x, "value")))
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    return jax.tree.unflatten(treedef, [(1 + rng.normal(0, 0.1, x.shape) if p[-1].key == "scale" else
                                         rng.normal(0, cfg.init_std, x.shape)).astype(np.float32) for p, x in leaves])


def random_lora(params: dict, targets) -> dict:
    """init_lora's A and a random B (as if trained): the merged model differs from the base."""
    lora = init_lora(params, targets, RANK, jax.random.key(1))
    rng = np.random.default_rng(2)
    return jax.tree.map(lambda x: np.asarray(x) if x.ndim and np.any(x) else rng.normal(0, 0.2, x.shape)
                        .astype(np.float32), lora)


def publish_lora_run(lineage: Lineage, cfg: ModelConfig, targets) -> dict:
    base = random_params(cfg)
    lora = random_lora(base, targets)
    merged = jax.tree.map(np.asarray, merge(base, lora, lora_scale(ALPHA, RANK)))
    tok = ByteTokenizer()
    lineage.publish("base", base, cfg, tok, parents=[])
    lineage.publish("tuned", merged, cfg, tok, parents=["base"], artifacts={"lora": lora},
                    strategy={"kind": "lora", "lora": {"rank": RANK, "alpha": ALPHA, "targets": list(targets)}})
    return lora


def logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_adapter_on_the_parent_equals_the_merged_export(tmp_path, family, capsys):
    cfg, targets = CASES[family]
    lin = str(tmp_path / "lin")
    lora = publish_lora_run(Lineage(lin), cfg, targets)
    tool = load_tool("lineage")
    assert tool.main(["--dir", lin, "export", "base", "--out", str(tmp_path / "base")]) == 0
    assert tool.main(["--dir", lin, "export", "tuned", "--out", str(tmp_path / "tuned"), "--peft-base",
                      str(tmp_path / "base")]) == 0
    assert "PEFT adapter of LoRA version 'tuned'" in capsys.readouterr().out
    adapter = tmp_path / "tuned" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 12, "bias": "none",
        "fan_in_fan_out": False}
    assert sorted(config["target_modules"]) == sorted(HF_NAMES[t] for t in targets)
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731
    # The key names are exactly those peft saves for the same LoRA config.
    reference = peft.get_peft_model(load(tmp_path / "base"), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=config["target_modules"], task_type="CAUSAL_LM"))
    assert set(load_file(str(adapter / "adapter_model.safetensors"))) == {
        k for k in peft.get_peft_model_state_dict(reference) if "lora_" in k}

    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16)).astype(np.int64)
    with_adapter = peft.PeftModel.from_pretrained(load(tmp_path / "base"), str(adapter)).eval()
    got, merged, base = logits(with_adapter, tokens), logits(load(tmp_path / "tuned"), tokens), logits(load(
        tmp_path / "base"), tokens)
    diff = float(np.max(np.abs(got - merged)))
    print(f"{family}: PEFT adapter vs merged export max |logit diff| = {diff:.2e}; "
          f"merged vs base {np.max(np.abs(merged - base)):.2f}")
    assert np.max(np.abs(merged - base)) > 0.5  # the adapter is far from a no-op
    assert diff <= 1e-4
    # Scan-stacked adapters (a scan_layers run's artifact) convert to the very same tensors.
    stacked, _, _ = peft_state(stack_layers(lora), cfg)
    flat, rank, _ = peft_state(lora, cfg)
    assert rank == RANK and sorted(stacked) == sorted(flat)
    for name in flat:
        np.testing.assert_array_equal(stacked[name], flat[name])


def test_gpt2_is_refused_in_one_line(tmp_path, capsys):
    cfg = ModelConfig(family="gpt2", vocab_size=320, d_model=32, n_layers=1, n_heads=4, d_ff=128, max_seq_len=32,
                      tie_embeddings=True)
    params = random_params(cfg)
    lora = random_lora(params, ("q", "v"))
    with pytest.raises(HFError, match="c_attn"):
        peft_state(lora, cfg)
    lin = Lineage(str(tmp_path / "lin"))
    lin.publish("tuned", params, cfg, ByteTokenizer(), parents=[], artifacts={"lora": lora},
                strategy={"kind": "lora", "lora": {"rank": RANK, "alpha": ALPHA, "targets": ["q", "v"]}})
    out = tmp_path / "out"
    assert load_tool("lineage").main(["--dir", lin.directory, "export", "tuned", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no PEFT adapter for LoRA version 'tuned': gpt2 fuses q, k and v into one c_attn" in printed
    assert (out / "model.safetensors").is_file() and not (out / "adapter").exists()
