"""Collectives in a compiled training step, per mesh: how many, how many bytes, against the gradient bytes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_collectives.py \
        [--config configs/tiny.yaml] [--meshes 8x1x1,1x8x1,2x2x2,1x1x8] [--dump DIR] [key.sub=value ...]

Meshes are data x fsdp x tensor. For each it compiles the real train step (`lmadapt.session.build`) and
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


from lmadapt.config import ConfigError, load_config  # noqa: E402
from lmadapt.hlo import step_communication  # noqa: E402
from lmadapt.session import build  # noqa: E402


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
        comm = step_communication(build(cfg, log=lambda _: None))
        print(f"\nmesh data={d} fsdp={f} tensor={t}: gradients {comm.grad_bytes / 2**20:.3f} MiB "
              f"({comm.grad_bytes_per_device / 2**20:.3f} MiB held per device); all-reduce + reduce-scatter "
              f"{comm.reduced_bytes / 2**20:.3f} MiB/device = {comm.reduced_bytes / comm.grad_bytes:.2f}x "
              f"the gradients")
        print(comm.collectives.table())
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"train_step_{mesh}.hlo.txt"), "w") as fh:
                fh.write(comm.hlo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
