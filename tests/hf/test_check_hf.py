"""tools/check_hf.py and lmadapt.hf.logit_check: passes on a correct export of each family, fails (exit 1) on a
perturbed weight and on a different tokenizer, exit 2 on bad input, exit 3 without transformers."""

import importlib.util
import lzma
import os
import shutil
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from lmadapt.config import ModelConfig, RopeScalingConfig  # noqa: E402
from lmadapt.data.tokenizers import train_bpe  # noqa: E402
from lmadapt.hf import export_hf  # noqa: E402
from lmadapt.hf.logit_check import CheckReport, check_hf, check_sides  # noqa: E402
from lmadapt.lineage.store import Lineage  # noqa: E402
from lmadapt.model import init_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SMALL = dict(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=80, max_seq_len=64, init_std=0.2)
# Each family with the options its real checkpoints use, dimensions shrunk; the 16-token prompt plus 20 generated
# tokens run past gemma2's 8-token window.
CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=400, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=RopeScalingConfig(type="llama3", factor=8.0, original_max_len=16), **SMALL),
    "qwen2": ModelConfig(family="qwen2", vocab_size=416, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True,
                         **SMALL),
    "qwen3": ModelConfig(family="qwen3", vocab_size=416, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True,
                         **SMALL),
    "gemma2": ModelConfig(family="gemma2", vocab_size=400, norm_eps=1e-6, tie_embeddings=True, sliding_window=8,
                          global_layer_every=2, attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=16,
                          **SMALL),
}


def load_tool():
    spec = importlib.util.spec_from_file_location("check_hf_tool", os.path.join(ROOT, "tools", "check_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Every leaf random (norm scales near 1), so a mapping mistake anywhere shows in the logits."""
    shapes = jax.eval_shape(lambda: jax.tree.map(lambda b: b.value, init_params(cfg, jax.random.key(0)),
                                                 is_leaf=lambda x: hasattr(x, "value")))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    values = []
    for path, leaf in leaves:
        noise = rng.normal(0, cfg.init_std, leaf.shape).astype(np.float32)
        values.append(1 + noise / 2 if path[-1].key == "scale" else noise)
    return jax.tree.unflatten(treedef, values)


@pytest.fixture(scope="module")
def tokenizers():
    """Two byte-level BPEs of 400 ids trained on different text: the same vocabulary size, different encodings."""
    with lzma.open(os.path.join(ROOT, "data", "shakespeare.txt.xz"), "rt", encoding="utf-8") as f:
        text = f.read(200_000)
    return train_bpe([text[:100_000]], 400), train_bpe([text[100_000:]], 400)


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_passes_on_a_correct_export(tmp_path, tokenizers, family, capsys):
    cfg = CONFIGS[family]
    out = export_hf(str(tmp_path / "hf"), random_params(cfg), cfg, tokenizer=tokenizers[0])
    assert load_tool().main([out]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "result: PASS" in printed and "tokens equal: yes" in printed and "8 texts, all encode identically" in printed


def test_qwen2_export_with_a_trained_tokenizer_is_flagged(tmp_path, tokenizers):
    # transformers 5 loads any model_type "qwen2" directory's tokenizer as Qwen2Tokenizer, which replaces the
    # tokenizer.json's normalizer and split with Qwen's (NFC, single digits): the export warns, and the checker
    # reports the encoding difference while the weights agree.
    cfg = CONFIGS["qwen2"]
    with pytest.warns(UserWarning, match="Qwen2Tokenizer"):
        out = export_hf(str(tmp_path / "hf"), random_params(cfg), cfg, tokenizer=tokenizers[0])
    report = check_hf(out)
    assert report.tokenizer.failed and report.logits.max_abs_diff < 1e-4 and report.exit_code() == 1


@pytest.fixture(scope="module")
def exported_version(tmp_path_factory, tokenizers):
    """(lineage dir, HF dir): version v1 of a lineage exported to the HF dir."""
    root = tmp_path_factory.mktemp("versioned")
    cfg, params = CONFIGS["llama"], random_params(CONFIGS["llama"], seed=3)
    Lineage(str(root / "lin")).publish("v1", params, cfg, tokenizers[0], parents=[])
    return str(root / "lin"), export_hf(str(root / "hf"), params, cfg, tokenizer=tokenizers[0])


def test_fails_on_a_perturbed_weight(exported_version, tmp_path):
    lin, hf_dir = exported_version
    assert check_hf(hf_dir, lineage_dir=lin, version="v1").exit_code() == 0
    bad = shutil.copytree(hf_dir, tmp_path / "bad")
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= np.float32(1.01)
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    report = check_hf(str(bad), lineage_dir=lin, version="v1")
    assert report.exit_code() == 1 and not report.tokenizer.failed
    assert report.logits.max_abs_diff > 1e-3 and report.failures()[0].startswith("max |logit diff|")
    # DIR alone is self-consistent: lmadapt and transformers read the same perturbed file.
    assert check_hf(str(bad)).exit_code() == 0
    # Without transformers the version is still compared with DIR (as lmadapt imports it): exit 1, or 3 if equal.
    assert check_hf(str(bad), lineage_dir=lin, version="v1", use_transformers=False).exit_code() == 1
    alone = check_hf(hf_dir, lineage_dir=lin, version="v1", use_transformers=False)
    assert alone.exit_code() == 3 and alone.logits.max_abs_diff == 0 and alone.generation.equal
    nothing = check_hf(hf_dir, use_transformers=False)  # nothing to compare with: lmadapt's generation only
    assert nothing.exit_code() == 3 and nothing.logits is None and nothing.generation.candidate


def test_fails_on_a_different_tokenizer(exported_version, tokenizers, tmp_path, capsys):
    lin, _ = exported_version
    cfg = CONFIGS["llama"]
    other = export_hf(str(tmp_path / "hf"), random_params(cfg, seed=3), cfg, tokenizer=tokenizers[1])
    assert load_tool().main([other, "--lineage", lin, "--version", "v1"]) == 1
    printed = capsys.readouterr().out
    assert "texts encode differently  [FAIL]" in printed and "first: " in printed
    assert "result: FAIL (tokenizer)" in printed


def test_bad_input_is_one_line(exported_version, tmp_path, capsys):
    lin, hf_dir = exported_version
    text = tmp_path / "empty.txt"
    text.write_text("")
    tool = load_tool()
    for argv, message in (([str(tmp_path / "nope")], "no such directory"),
                          ([hf_dir, "--lineage", lin], "--lineage and --version go together"),
                          ([hf_dir, "--lineage", lin, "--version", "v9"], "no version 'v9'"),
                          ([hf_dir, "--text", str(text)], "the file is empty"),
                          ([str(tmp_path)], "no config.json")):
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


class Counter:
    """A stand-in model over 50 ids whose greedy continuation counts up: logits 5 at (last + 1) % 50 (and, with
    `tie`, at (last + 2) % 50 too); `flip` makes its decode take (last + 2) at that step instead."""

    name, vocab_size, has_tokenizer, cfg = "counter", 50, True, types.SimpleNamespace(max_seq_len=64)

    def __init__(self, tie: bool = False, flip: int | None = None):
        self.tie, self.flip = tie, flip

    def encode(self, texts):
        return [[ord(c) % 50 for c in t] for t in texts]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def bos_id(self):
        return None

    def logits(self, tokens):
        out = np.zeros((len(tokens), 50), np.float32)
        out[np.arange(len(tokens)), (tokens + 1) % 50] = 5
        if self.tie:
            out[np.arange(len(tokens)), (tokens + 2) % 50] = 5
        return out

    def generate(self, prompt, n):
        seq = [int(prompt[-1])]
        for i in range(n):
            seq.append((seq[-1] + (2 if i == self.flip else 1)) % 50)
        return np.asarray(seq[1:])


@pytest.mark.parametrize("tie,code", [(False, 1), (True, 0)])
def test_generation_difference_fails_unless_a_near_tie(tie, code):
    report = check_sides(Counter(tie=tie), Counter(tie=tie, flip=3), CheckReport("counter", None, "float32", 1e-4),
                         ["some text"], 128, 20)
    assert report.logits.max_abs_diff == 0 and not report.tokenizer.failed
    assert report.generation.first_diff == 3 and report.exit_code() == code
    assert ("a near tie" in "\n".join(report.lines())) == tie


def test_a_cudnn_trained_model_is_checked_in_float32_on_xla_attention():
    # cuDNN has no float32 kernel: on a GPU the float32 check of a cuDNN-trained version would stop in JAX.
    from lmadapt.hf.logit_sides import _compute

    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, attention="cudnn", dtype="bfloat16")
    assert _compute(cfg, "float32").attention == "xla" and _compute(cfg, "bfloat16").attention == "cudnn"
    assert _compute(cfg, "float32").dtype == "float32"
