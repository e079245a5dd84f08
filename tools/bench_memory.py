"""Training memory per continual strategy, from XLA's buffer plan of the compiled step.

    python tools/bench_memory.py [--config configs/tiny.yaml] [key.sub=value ...]

Publishes a short base run into a temporary lineage (with a Fisher, so EWC has one), then compiles the
train step of each strategy started from it and reads `compiled.memory_analysis()`: the state held
between steps (params, optimizer state, and `ref`: anchor, Fisher or teacher), the temporaries of one
step (gradients and activations), and their sum, in bytes per parameter and as extra over plain
fine-tuning. The plan is exact and noise-free (no timing), for the device the step compiles for.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from lmadapt.config import ConfigError, load_config  # noqa: E402
from lmadapt.lineage.origin import resolve_origin  # noqa: E402
from lmadapt.model import count_params  # noqa: E402
from lmadapt.session import build  # noqa: E402
from lmadapt.trainer import train  # noqa: E402
from tools.bench_train import compiled_memory  # noqa: E402

STRATEGIES = {
    "fine-tune (all params)": [],
    "freeze embeddings": ["optimizer.groups=[{name: embed, select: [embeddings], frozen: true}]"],
    "L2-SP": ["continual.l2sp=0.01"],
    "EWC": ["continual.ewc=1.0"],
    "distill (LwF)": ["continual.distill.weight=0.5"],
    "LoRA r=8 (q,v)": ["continual.lora.rank=8"],
    "fine-tune, remat=full": ["model.remat=full"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lineage = os.path.join(tmp, "lineage")
        common = [*args.overrides, f"lineage.dir={lineage}", "eval.every=0", "logging.every=1000"]
        try:
            base = load_config(args.config, [*common, f"run.dir={tmp}/base", "train.steps=1", "version.id=base",
                                             "continual.fisher.compute=true", "continual.fisher.batches=1"])
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                train(base)
            rows = []
            for name, extra in STRATEGIES.items():
                cfg = load_config(args.config, [*common, *extra, f"run.dir={tmp}/{len(rows)}",
                                                "init.from_version=base"])
                origin = resolve_origin(cfg)
                session = build(origin.cfg, tokenizer=origin.tokenizer, origin=origin, log=lambda _: None)
                with session.activate():
                    compiled = session.step_fn.lower(session.abstract_state, session.batch(0)).compile()
                rows.append((name, compiled_memory(compiled), count_params(session.abstract_state.params)))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    m = base.model
    n_model = rows[0][2]
    print(f"device: {jax.devices()[0].device_kind}; model {m.family} L{m.n_layers} d{m.d_model}, {n_model / 1e6:.2f}M "
          f"params; batch {base.train.batch_size} x seq {base.train.seq_len}; bytes per model parameter")
    if rows[0][1] is None:
        print("this backend gives no memory analysis")
        return 1
    ref_total = rows[0][1]["total"]
    print(f"{'strategy':<24} {'state B/p':>10} {'temp B/p':>9} {'total B/p':>10} {'total MiB':>10} "
          f"{'vs fine-tune':>13}")
    for name, mem, _ in rows:
        print(f"{name:<24} {mem['arguments'] / n_model:>10.1f} {mem['temp'] / n_model:>9.1f} "
              f"{mem['total'] / n_model:>10.1f} {mem['total'] / 2**20:>10.1f} {mem['total'] / ref_total:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
