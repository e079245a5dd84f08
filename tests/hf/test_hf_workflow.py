"""The README's "Start from a Hugging Face model" commands, in order, on a random checkpoint shaped like a
downloaded Qwen2.5 directory (safetensors, config.json, a byte-level BPE tokenizer.json with Qwen's pipeline and a
chat template): import, update with replay, evaluate, export in bf16, and check the export against transformers."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lzma  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402

import eval as eval_py  # noqa: E402
import train  # noqa: E402
from lmadapt.data.tokenizers import load_tokenizer  # noqa: E402
from lmadapt.lineage.store import Lineage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen_download(tmp_path_factory) -> str:
    with lzma.open(os.path.join(ROOT, "data", "books_en.txt.xz"), "rt", encoding="utf-8") as f:
        text = f.read(300_000)
    tok = Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=480, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = str(tmp_path_factory.mktemp("Qwen2.5-tiny"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                         chat_template=TEMPLATE).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=0.1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_readme_commands_on_a_downloaded_checkpoint(qwen_download, tmp_path):
    lineage, out = str(tmp_path / "lineage"), str(tmp_path / "hf" / "qwen-docs")
    for name in ("python_docs", "books_en"):  # the config's corpora, cut to 150 kB to keep the test short
        with lzma.open(os.path.join(ROOT, "data", f"{name}.txt.xz"), "rt", encoding="utf-8") as f:
            (tmp_path / f"{name}.txt").write_text(f.read(150_000), encoding="utf-8")
    data = [f"data.sources.0.path={tmp_path}/python_docs.txt", f"data.replay.sources.0.path={tmp_path}/books_en.txt",
            f"data.cache_dir={tmp_path}/cache", "eval.batches=1"]
    small = ["train.steps=3", "train.batch_size=8", "train.seq_len=64", "model.dtype=float32", "model.remat=none",
             "checkpoint.every=0", "eval.every=0", "logging.progress=false", f"run.dir={tmp_path}/run"]
    config = os.path.join(ROOT, "configs", "hf-update.yaml")
    check = tool("check_hf")

    assert check.main([qwen_download]) == 0
    assert tool("lineage").main(["--dir", lineage, "import-hf", qwen_download, "--id", "qwen-base"]) == 0
    assert train.main(["--config", config, f"lineage.dir={lineage}", "init.from_version=qwen-base",
                       "version.id=qwen-docs", *data, *small]) == 0
    lin = Lineage(lineage)
    assert lin.record("qwen-docs")["parents"] == ["qwen-base"]
    own = load_tokenizer(qwen_download)
    assert lin.tokenizer("qwen-docs").fingerprint == own.fingerprint  # trained with the checkpoint's tokenizer
    assert eval_py.main(["--lineage", lineage, "--config", config, "--prompt", "def fibonacci(n):",
                         "--max-new-tokens", "8", "--out", str(tmp_path / "eval"), *data, "train.seq_len=64"]) == 0
    assert tool("lineage").main(["--dir", lineage, "export", "qwen-docs", "--out", out, "--dtype", "bfloat16"]) == 0
    assert check.main([out]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == TEMPLATE
    code = "def f(x):\n    return x  +  1\n\n"
    assert exported(code, add_special_tokens=False)["input_ids"] == own.encode([code])[0]
