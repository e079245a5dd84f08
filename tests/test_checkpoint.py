"""In-run checkpoints restore onto any mesh; a mismatched restore fails with a clear message."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmadapt.checkpoint import Checkpointer, CheckpointError
from lmadapt.session import build


def by_path(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf for path, leaf in flat}


def test_restore_onto_other_meshes(tmp_path, tiny_config):
    ckpt_dir = str(tmp_path / "ckpt")
    saver = build(tiny_config("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"))
    with saver.activate():
        state = saver.init_fn(jax.random.PRNGKey(3))
        state, _ = saver.step_fn(state, saver.batch(0))  # non-trivial optimizer state too
    ckpt = Checkpointer(ckpt_dir, saver.cfg.checkpoint)
    ckpt.save(1, state, {"note": "fsdp8"})
    ckpt.close()
    reference = {k: np.asarray(v) for k, v in by_path(jax.device_get(state)).items()}
    assert by_path(state.params)["layers_0/mlp/up/kernel"].sharding.spec == P("fsdp", None)

    for overrides, devices, spec in [
        (("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4"), None, P(None, "tensor")),
        (("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"), jax.devices()[:1], P(None, None)),
    ]:
        session = build(tiny_config(*overrides), devices=devices)
        ckpt = Checkpointer(ckpt_dir, session.cfg.checkpoint)
        with session.activate():
            restored, meta = ckpt.restore(1, session.abstract_state)
        ckpt.close()
        assert meta == {"note": "fsdp8"}
        assert by_path(restored.params)["layers_0/mlp/up/kernel"].sharding.spec == spec
        for k, v in by_path(jax.device_get(restored)).items():
            np.testing.assert_array_equal(np.asarray(v), reference[k], err_msg=k)


def test_shape_mismatch_fails_clearly(tmp_path, tiny_config):
    session = build(tiny_config("mesh.data=8"))
    with session.activate():
        state = session.init_fn(jax.random.PRNGKey(0))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), session.cfg.checkpoint)
    ckpt.save(1, state, {})
    ckpt.close()
    wider = build(tiny_config("mesh.data=8", "model.d_ff=192"))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), wider.cfg.checkpoint)
    with pytest.raises(CheckpointError, match=r"layers_0/mlp/down/kernel is float32\[128, 64\] in the checkpoint "
                                              r"but the model expects float32\[192, 64\]"):
        ckpt.restore(1, wider.abstract_state)
    deeper = build(tiny_config("mesh.data=8", "model.n_layers=3"))
    with pytest.raises(CheckpointError, match=r"tree does not match the model: missing \[.*layers_2"):
        ckpt.restore(1, deeper.abstract_state)
    ckpt.close()


def test_keep_policy_last_n_plus_every_m(tmp_path):
    from lmadapt.config import CheckpointConfig

    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(keep=2, keep_every=4, async_save=False))
    for step in range(1, 10):
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]
    ckpt.close()
