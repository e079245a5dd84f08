"""Check the in-run checkpoints of a training run against their content manifests.

    python tools/checkpoints.py RUN_DIR      # one line per checkpoint; exit 1 if any is damaged

A checkpoint is `intact` (every file matches its manifest), `unsealed` (committed, but the run stopped
before writing the manifest: Orbax's commit record is whole, so a resume restores it and refuses it if
any array comes back non-finite) or `DAMAGED` with each problem listed. Nothing is written: the tool
is safe beside a live run. The trainer resumes only from an intact or unsealed newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run's directory (run.dir)")
    args = parser.parse_args(argv)
    directory = os.path.join(args.run_dir, "checkpoints")
    if not os.path.isdir(directory):
        print(f"error: {directory!r} not found (is {args.run_dir!r} a run directory?)", file=sys.stderr)
        return 2

    from lmadapt.checkpoint import Checkpointer
    from lmadapt.config import CheckpointConfig
    from lmadapt.run.resume import checkpoint_problems, manifest_present

    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False), read_only=True)
    damaged = 0
    steps = sorted(ckpt.all_steps())
    if not steps:
        print(f"{directory}: no complete checkpoints")
    for step in steps:
        problems = checkpoint_problems(ckpt, step)
        if not problems:
            print(f"{step}: intact" if manifest_present(ckpt, step) else
                  f"{step}: unsealed (no manifest; Orbax's commit record whole: restored if its arrays are finite)")
        else:
            damaged += 1
            print(f"{step}: DAMAGED")
            for p in problems:
                print(f"    {p}")
    ckpt.close()
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
