"""Collectives of the compiled train step (lmadapt/hlo.py): each gradient is reduced once."""

import pytest

from lmadapt.hlo import count_collectives, step_communication
from lmadapt.session import build

SAMPLE = """
  %all-reduce.23 = (f32[320,64]{1,0}, f32[], /*index=2*/bf16[8]{0}) all-reduce(%a, %b, %c), channel_id=1
  %ag = f32[4,16]{1,0} all-gather-start(%x), dimensions={0}
  %ag.done = f32[4,16]{1,0} all-gather-done(%ag)
  %cp = s32[2]{0} collective-permute(%y), source_target_pairs={{0,1}}
  %get = f32[] get-tuple-element(%all-reduce.23), index=1
"""


def test_counts_tuple_and_async_collectives_once_with_their_bytes():
    col = count_collectives(SAMPLE)
    assert dict(col.count) == {"all-reduce": 1, "all-gather": 1, "collective-permute": 1}
    assert col.bytes["all-reduce"] == 320 * 64 * 4 + 4 + 8 * 2
    assert col.bytes["all-gather"] == 4 * 16 * 4
    assert col.bytes["collective-permute"] == 8


@pytest.mark.parametrize("mesh,bound", [(("mesh.data=8",), 1.0), (("mesh.data=1", "mesh.fsdp=8"), 1.0),
                                        (("mesh.data=2", "mesh.fsdp=4"), 1.25)])
def test_gradients_are_reduced_once(tiny_config, mesh, bound):
    """Without tensor parallelism the only reductions are the gradients' (plus a few metric scalars): their
    bytes add up to at most one full copy of the gradients. On a data x fsdp mesh XLA reduces the untied
    head's gradient in two stages (over fsdp, then over data on the fsdp shard), hence 1.25
    (docs/performance.md)."""
    comm = step_communication(build(tiny_config(*mesh), log=lambda _: None))
    col, grad_bytes = comm.collectives, comm.grad_bytes
    assert 0.5 * grad_bytes < comm.reduced_bytes <= bound * grad_bytes + 1024, (dict(col.count), dict(col.bytes),
                                                                             grad_bytes)
    if mesh == ("mesh.data=8",):
        # Pure data parallelism: XLA combines every gradient into one all-reduce, and gathers nothing.
        assert col.count["all-reduce"] <= 2 and col.count["all-gather"] == 0, dict(col.count)
