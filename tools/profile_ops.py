"""The operations a `jax.profiler` trace spent its time in, from the trace's xplane file (no TensorBoard).

    python tools/profile_ops.py TRACE_DIR [--top 15]

On a GPU the device plane's "XLA Ops" line is read (kernels as XLA names them: fusions, cuBLAS / cuDNN
custom calls); on a CPU, the host's XLA thunks. Prints the top operations by total time and the same
grouped by kind (the name without its `.N` suffix), each with its share of the traced op time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

# Host events that wait, keep books or contain the ops (XLA CPU's thunk executor), not ops themselves.
NOT_OPS = re.compile(r"^(ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|.*::Await|.*Wait)")


def op_times(trace_dir: str) -> dict[str, float]:
    """Total nanoseconds per operation name in the newest trace under `trace_dir`."""
    import jax

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb trace under it")
    data = jax.profiler.ProfileData.from_file(files[-1])
    device = [p for p in data.planes if p.name.startswith("/device:")]
    lines = ([ln for p in device for ln in p.lines if ln.name == "XLA Ops"] if device else
             [ln for p in data.planes if p.name == "/host:CPU" for ln in p.lines if ln.name != "python"])
    totals: dict[str, float] = collections.defaultdict(float)
    for line in lines:
        for event in line.events:
            if not NOT_OPS.match(event.name):
                totals[event.name] += event.duration_ns
    return dict(totals)


def top_ops(trace_dir: str, top: int = 15) -> dict[str, list[tuple[str, float, float]]]:
    """{"ops": [(name, ms, share)], "kinds": [(kind, ms, share)]}, the `top` largest of each."""
    totals = op_times(trace_dir)
    whole = sum(totals.values()) or 1.0
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, ns in totals.items():
        kinds[re.sub(r"(\.\d+)+$", "", name)] += ns

    def ranked(table: dict[str, float]) -> list[tuple[str, float, float]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(name, ns / 1e6, ns / whole) for name, ns in rows]

    return {"ops": ranked(totals), "kinds": ranked(kinds)}


def print_top(summary: dict[str, list[tuple[str, float, float]]]) -> None:
    for title, key in (("top operations", "ops"), ("by kind", "kinds")):
        print(f"{title} (share of traced op time):")
        for name, ms, share in summary[key]:
            print(f"  {share:6.1%} {ms:10.2f} ms  {name[:100]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    try:
        print_top(top_ops(args.trace_dir, args.top))
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
