"""Sharded training equals single-device training, and parameters are laid out as the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmadapt import sharding
from lmadapt.config import MeshConfig
from lmadapt.trainer import build


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
    "data8": ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
    "d2f2t2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}

EXPECTED_SPECS = {
    "data8": {"embed/embedding": P(None, None), "layers_0/attn/q/kernel": P(None, None, None)},
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_losses_match_single_device(tiny_config, family):
    extra = ["model.family=gpt2", "model.tie_embeddings=true"] if family == "gpt2" else []
    base = tiny_config(*extra, "mesh.data=1")
    ref, _ = run_steps(base, jax.devices()[:1])
    assert len(jax.devices()) == 8
    for name, mesh in MESHES.items():
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


def test_indivisible_dimension_is_replicated_not_an_error():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    spec = sharding.spec_for(("vocab", "embed"), (250, 64), mesh, MeshConfig().rules)
    assert spec == P(None, None)
    spec = sharding.spec_for(("vocab", "embed"), (256, 64), mesh, MeshConfig().rules)
    assert spec == P("tensor", None)


def test_mesh_size_mismatch_names_keys():
    with pytest.raises(sharding.ShardingError, match="must equal the device count"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    assert dict(sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_batch_not_divisible_by_shards_is_a_config_error(tiny_config):
    from lmadapt.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by the 8 batch shards"):
        build(tiny_config("mesh.data=8", "train.batch_size=12"))
