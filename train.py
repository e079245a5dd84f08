"""Launch a training job: `python train.py [--config configs/X.yaml] [key.sub=value ...]`.

Restarting the same command on the same `run.dir` resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "configs/default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML run config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the parameter groups (count, learning rate, decay, frozen) and the strategy, "
                             "then exit without training")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 model.d_model=128")
    args = parser.parse_args(argv)

    # Imported late so that `--help` and config errors answer without initialising JAX.
    from lmadapt.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from lmadapt.trainer import dry_run, train

        if args.dry_run:
            print(dry_run(cfg))
        else:
            train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
