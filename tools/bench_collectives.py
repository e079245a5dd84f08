"""Collectives in a compiled training step, per mesh: how many, how many bytes, against the gradient bytes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_collectives.py \
        [--config configs/tiny.yaml] [--meshes 8x1x1,1x8x1,2x2x2,1x1x8] [--dump DIR] [key.sub=value ...]

Meshes are data x fsdp x tensor. For each it compiles the real train step (`lmadapt.trainer.build`) and
prints the collectives of the optimized HLO with their per-device result bytes, and the ratio of reduced
bytes (all-reduce + reduce-scatter) to the gradients' bytes: about 1 means every gradient is reduced once
(tensor parallelism adds the activations' all-reduces on top, see docs/performance.md).
`--dump` writes each optimized HLO module for reading.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmadapt.config import ConfigError, load_config  # noqa: E402
from lmadapt.hlo import count_collectives  # noqa: E402
from lmadapt.trainer import build  # noqa: E402


def step_collectives(cfg) -> tuple[object, float, float, str]:
    """(collectives, bytes of all gradients, gradient bytes held per device, optimized HLO) of cfg's step."""
    session = build(cfg)
    with session.activate():
        compiled = session.step_fn.lower(session.abstract_state, session.batch(0)).compile()
    # A device holds each parameter's shard; its gradient is reduced to the same layout.
    full = shard = 0.0
    for leaf in jax.tree.leaves(session.abstract_state.params):
        full += float(np.prod(leaf.shape)) * leaf.dtype.itemsize
        shard += float(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    text = compiled.as_text()
    return count_collectives(text), full, shard, text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--meshes", default="8x1x1,1x8x1,2x2x2,1x1x8")
    p.add_argument("--dump", default=None, help="directory for the optimized HLO of each mesh")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    for mesh in args.meshes.split(","):
        d, f, t = (int(x) for x in mesh.split("x"))
        try:
            cfg = load_config(args.config, [*args.overrides, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        col, full, shard, text = step_collectives(cfg)
        reduced = col.bytes["all-reduce"] + col.bytes["reduce-scatter"]
        print(f"\nmesh data={d} fsdp={f} tensor={t}: gradients {full / 2**20:.3f} MiB ({shard / 2**20:.3f} MiB held "
              f"per device); all-reduce + reduce-scatter {reduced / 2**20:.3f} MiB/device = {reduced / full:.2f}x "
              f"the gradients")
        print(col.table())
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"train_step_{mesh}.hlo.txt"), "w") as fh:
                fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
