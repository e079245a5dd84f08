"""Config loading: YAML + base includes + overrides, typed, with one-line errors naming the problem."""

import os

import pytest

from helpers import ROOT, run_cmd
from lmadapt.config import ConfigError, load_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_shipped_config_loads():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "configs")):
        for f in files:
            if f.endswith(".yaml"):
                # hf-update.yaml updates a pretrained model: it is always run with init.from_version/from_hf.
                load_config(os.path.join(dirpath, f), ["init.from_hf=models/x"] if f == "hf-update.yaml" else [])


def test_base_include_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  d_model: 96\n  n_heads: 4\ntrain:\n  steps: 7\n")
    path = write(tmp_path, "run.yaml", "base: base.yaml\ntrain:\n  batch_size: 4\n")
    cfg = load_config(path, ["train.steps=9", "optimizer.lr=1e-3", "model.n_kv_heads=2", "mesh.rules=[[batch, data]]"])
    assert cfg.model.d_model == 96 and cfg.train.batch_size == 4 and cfg.train.steps == 9
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.n_kv_heads == 2 and cfg.mesh.rules == (("batch", "data"),)


def test_source_list_and_indexed_overrides(tmp_path):
    text = "data:\n  sources:\n    - {name: a, path: x.txt}\n    - {name: b, path: y.txt}\n"
    path = write(tmp_path, "run.yaml", text)
    cfg = load_config(path, ["data.sources.1.weight=3", "data.replay.fraction=0.25",
                             "data.replay.sources=[{name: old, path: z.txt}]"])
    assert [s.name for s in cfg.data.sources] == ["a", "b"] and cfg.data.sources[1].weight == 3.0
    assert cfg.data.replay.sources[0].name == "old" and cfg.data.replay.fraction == 0.25


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("train:\n  stepz: 3\n", [], "unknown key 'train.stepz'"),
        ("", ["model.widht=3"], "unknown key 'model.widht'"),
        ("train:\n  steps: many\n", [], "key 'train.steps' has value 'many'; expected int"),
        ("train:\n  steps: true\n", [], "key 'train.steps' has value True; expected int"),
        ("model:\n  family: bert\n", [],
         "key 'model.family' has value 'bert'; expected one of 'llama', 'mistral', 'qwen2', 'qwen3', 'gemma2', 'gpt2'"),
        ("train:\n  batch_size: 0\n", [], "'train.batch_size' has value 0; expected a positive integer"),
        ("train:\n  seq_len: 4096\n", [], "at most model.max_seq_len=256"),
        ("model:\n  n_heads: 4\n  n_kv_heads: 3\n", [], "a divisor of model.n_heads=4"),
        ("mesh:\n  data: -1\n  fsdp: -1\n", [], "at most one axis set to -1"),
        ("train: [1, 2]\n", [], "key 'train': expected a mapping"),
        ("train:\n  steps: [\n", [], "not valid YAML"),
        ("data:\n  sources:\n    - name: a\n      pth: x\n", [], "unknown key 'data.sources.0.pth'"),
        ("data:\n  sources:\n    - name: a/b\n      path: x\n", [], "key 'data.sources.0.name' has value 'a/b'"),
        ("data:\n  replay:\n    fraction: 0.2\n", [], "key 'data.replay.sources' has value []"),
        ("", ["data.sources.3.path=x"], "data.sources is not set in the config file, so it has no entry 3"),
        ("data:\n  sources: [{name: a, path: x}]\n", ["data.sources.3.path=x"],
         "data.sources has 1 entries; '3' is not one of their indices"),
        ("data:\n  sources:\n    - name: c\n      kind: jsonl\n      path: x\n      format: classification\n",
         [], "key 'data.sources.0.labels' has value None"),
        ("tokenizer:\n  kind: hf\n", [], "key 'tokenizer.path' has value None; expected a tokenizer.json or a dir"),
        ("tokenizer:\n  kind: bpe\n  vocab_size: 100\n", [], "'tokenizer.vocab_size' has value 100; expected between "
         "259 and model.vocab_size"),
        ("tokenizer:\n  kind: wordpiece\n", [], "expected one of 'bytes', 'bpe', 'sentencepiece', 'hf'"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, overrides, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
    if not overrides and "YAML" not in needle:
        assert path in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "configs/does-not-exist.yaml"], "config file 'configs/does-not-exist.yaml' not found"),
        (["--config", "configs/tiny.yaml", "train.bogus=1"], "unknown key 'train.bogus'"),
        (["--config", "configs/tiny.yaml", "train.steps=abc"], "key 'train.steps' has value 'abc'; expected int"),
        (["--config", "configs/tiny.yaml", "mesh.data=3"], "must equal the device count"),
    ],
)
def test_train_py_config_errors_exit_nonzero_with_one_line(args, needle):
    result = run_cmd(["train.py", *args], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]


# Parameter counts published for the real checkpoints these files are shaped like.
PUBLISHED_PARAMS = {"llama3.2-1b": 1_235_814_400, "smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
                    "qwen3-0.6b": 596_049_920, "gemma2-2b": 2_614_341_888, "mistral-7b": 7_241_732_096}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_model_configs_shaped_like_real_checkpoints(name):
    import flax.linen as nn
    import jax

    from lmadapt.model import count_params, init_params

    cfg = load_config(os.path.join(ROOT, "configs", "model", f"{name}.yaml"), ["train.seq_len=256"])
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(cfg.model, jax.random.key(0))))
    assert count_params(shapes) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.sliding_window=8"], "key 'model.sliding_window' has value 8; expected null for the llama family"),
        (["model.family=qwen3", "model.attn_softcap=30"], "key 'model.attn_softcap' has value 30.0; expected null"),
        (["model.family=gpt2", "model.tie_embeddings=true", "model.rope_scaling.type=linear"],
         "key 'model.rope_scaling.type' has value 'linear'; expected 'default' for the gpt2 family"),
        (["model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=4"],
         "key 'model.rope_scaling.high_freq_factor' has value 4.0; expected above"),
        (["model.family=mistral", "model.sliding_window=0"], "key 'model.sliding_window' has value 0"),
        (["model.attention=cudnn", "model.dtype=float32"],
         "key 'model.attention' has value 'cudnn'; expected auto, xla or einsum with "
         "model.dtype=float32 (cuDNN's fused attention runs in bfloat16 only)"),
    ],
)
def test_family_options_a_family_lacks_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_a_recipe_fills_in_its_keys_under_the_users_and_only_for_updates():
    from lmadapt.config.recipes import RECIPES

    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    update = ["init.from_version=base", "lineage.dir=/nonexistent", "continual.recipe=replay-rewarm"]
    cfg = load_config(tiny, update)
    recipe = RECIPES["replay-rewarm"]
    assert cfg.data.replay.fraction == recipe["data.replay.fraction"] and cfg.data.replay.from_lineage
    assert cfg.data.replay.spread == recipe["data.replay.spread"]
    assert cfg.schedule.rewarm_fraction == recipe["schedule.rewarm_fraction"]
    # A key the user sets wins, wherever it is set (command line here, before or after the recipe).
    assert load_config(tiny, ["data.replay.fraction=0.1", *update]).data.replay.fraction == 0.1
    assert load_config(tiny, [*update, "data.replay.fraction=0.1"]).data.replay.fraction == 0.1
    # A base run (no parent) is unchanged, so a staged config can name the recipe once at the top.
    base = load_config(tiny, ["continual.recipe=replay-rewarm"])
    assert base.data.replay.fraction == 0.0 and base.schedule.rewarm_fraction is None
    assert base.continual.recipe == "replay-rewarm"  # and recorded
    with pytest.raises(ConfigError, match=r"continual.recipe' has value 'fast'; expected one of replay-rewarm"):
        load_config(tiny, ["continual.recipe=fast"])
