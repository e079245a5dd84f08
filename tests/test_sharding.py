"""Sharded training equals single-device training, and parameters are laid out as the rules say."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmadapt import sharding
from lmadapt.config import MeshConfig, ModelConfig, RopeScalingConfig
from lmadapt.model import Transformer, init_params
from lmadapt.session import build


def run_steps(cfg, devices, n_steps=3):
    session = build(cfg, devices=devices)
    losses = []
    with session.activate():
        state = session.init_fn(jax.random.PRNGKey(cfg.run.seed))
        for step in range(n_steps):
            state, metrics = session.step_fn(state, session.batch(step))
            losses.append(float(metrics["loss"]))
    return losses, state




MESHES = {
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
    "d2f2t2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}

EXPECTED_SPECS = {
    "fsdp8": {"embed/embedding": P(None, "fsdp"), "layers_0/attn/q/kernel": P("fsdp", None, None),
              "layers_0/mlp/down/kernel": P(None, "fsdp"), "final_norm/scale": P(None)},
    "d2f2t2": {"embed/embedding": P("tensor", "fsdp"), "layers_0/attn/q/kernel": P("fsdp", "tensor", None),
               "layers_0/attn/k/kernel": P("fsdp", "tensor", None), "layers_0/attn/o/kernel": P("tensor", None, "fsdp"),
               "layers_0/mlp/up/kernel": P("fsdp", "tensor"), "layers_0/mlp/down/kernel": P("tensor", "fsdp"),
               "lm_head/kernel": P("fsdp", "tensor"), "final_norm/scale": P(None)},
}


def by_path(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


@pytest.mark.devices(8)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_losses_match_single_device(tiny_config, family):
    extra = ["model.family=gpt2", "model.tie_embeddings=true"] if family == "gpt2" else []
    base = tiny_config(*extra, "mesh.data=1")
    ref, _ = run_steps(base, jax.devices()[:1])
    assert len(jax.devices()) == 8
    # gpt2 on the mesh that uses every axis; llama also on pure fsdp, and its layouts on both. (Pure data
    # parallelism is the data axis of d2f2t2 alone: not run separately, to keep the suite's time.)
    for name, mesh in (MESHES if family == "llama" else {"d2f2t2": MESHES["d2f2t2"]}).items():
        losses, state = run_steps(tiny_config(*extra, *mesh), jax.devices())
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f"mesh {name}")
        if family == "llama":
            params = by_path(state.params)
            for path, spec in EXPECTED_SPECS[name].items():
                assert params[path].sharding.spec == spec, (name, path, params[path].sharding.spec)
            # Adam moments are laid out like the parameters they belong to.
            mu = by_path(state.opt_state[1][0].mu)
            for path, spec in EXPECTED_SPECS[name].items():
                assert mu[path].sharding.spec == spec, (name, path)


# Each new family with the options its real checkpoints use (shrunk): loss and gradients of a packed batch on the
# mesh that uses every axis equal one device's. (The full train step per mesh is covered for llama and gpt2 above.)
FAMILY_OPTIONS = {
    "llama3": {"rope_scaling": RopeScalingConfig(type="llama3", factor=8.0, original_max_len=16),
               "tie_embeddings": True},
    "mistral": {"family": "mistral", "sliding_window": 8},
    "qwen2": {"family": "qwen2", "tie_embeddings": True},
    "qwen3": {"family": "qwen3", "head_dim": 32},
    "gemma2": {"family": "gemma2", "sliding_window": 8, "global_layer_every": 2, "attn_softcap": 50.0,
               "final_softcap": 30.0, "query_pre_attn_scalar": 24.0, "tie_embeddings": True},
}


def _loss_and_grads(cfg, params, batch):
    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, batch["tokens"], positions=batch["positions"],
                                        segment_ids=batch["segments"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][..., None], -1))

    return jax.value_and_grad(loss)(params)


@pytest.mark.devices(8)
@pytest.mark.parametrize("name", FAMILY_OPTIONS)
def test_sharded_loss_and_grads_match_single_device_for_each_family(name):
    cfg = ModelConfig(**{"n_kv_heads": 2, "max_seq_len": 64, **FAMILY_OPTIONS[name]})
    boxed = init_params(cfg, jax.random.key(0))
    params = nn.unbox(boxed)
    rng = np.random.default_rng(0)
    segments = np.repeat([[1] * 20 + [2] * 12], 8, axis=0)  # two documents per row
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (8, 32)), "segments": segments,
             "positions": np.concatenate([np.arange(20), np.arange(12)])[None].repeat(8, 0)}
    ref_loss, ref_grads = jax.jit(functools.partial(_loss_and_grads, cfg))(params, batch)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = MeshConfig().rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_as_tuples(rules)):
        placed = jax.device_put(params, nn.unbox(sharding.tree_shardings(boxed, mesh, rules)))
        sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
        loss, grads = jax.jit(functools.partial(_loss_and_grads, cfg))(placed, sharded_batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
    specs = by_path(placed)
    if name == "qwen2":  # q/k/v biases shard like their heads
        assert specs["layers_0/attn/q/bias"].sharding.spec == P("tensor", None)
    assert specs["layers_0/attn/q/kernel"].sharding.spec == P("fsdp", "tensor", None)


@pytest.mark.devices(8)
def test_indivisible_dimension_is_replicated_not_an_error():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    spec = sharding.spec_for(("vocab", "embed"), (250, 64), mesh, MeshConfig().rules)
    assert spec == P(None, None)
    spec = sharding.spec_for(("vocab", "embed"), (256, 64), mesh, MeshConfig().rules)
    assert spec == P("tensor", None)


@pytest.mark.devices(8)
def test_mesh_size_mismatch_names_keys():
    with pytest.raises(sharding.ShardingError, match="must equal the device count"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    assert dict(sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.devices(8)
def test_batch_not_divisible_by_shards_is_a_config_error(tiny_config):
    from lmadapt.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by the 8 batch shards"):
        build(tiny_config("mesh.data=8", "train.batch_size=12"))


def test_cudnn_attention_is_refused_in_one_line_where_there_is_no_gpu(tiny_config):
    from lmadapt.config import ConfigError

    cfg = tiny_config("model.attention=cudnn", "model.dtype=bfloat16", "mesh.data=1")
    if jax.default_backend() == "gpu":
        assert build(cfg, devices=jax.devices()[:1]).cfg.model.attention == "cudnn"
        return
    with pytest.raises(ConfigError, match="model.attention=cudnn needs NVIDIA GPUs .cuDNN.; this run's devices are "
                                          "cpu: use model.attention=auto"):
        build(cfg, devices=jax.devices()[:1])
