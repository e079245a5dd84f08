"""Launch a training job: `python train.py [--config configs/X.yaml] [key.sub=value ...]`.

With no --config it runs the quickstart (configs/quickstart.yaml): a base version, a continual update
on a new domain, and a report of what the update gained and forgot. Restarting the same command on
the same `run.dir` resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "configs/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML run config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the parameter groups (count, learning rate, decay, frozen) and the strategy, "
                             "then exit without training")
    parser.add_argument("--allow-config-change", default="", metavar="KEY,...",
                        help="on resume, accept changes to these config keys (or sections) beyond the runtime ones "
                             "(logging, eval, checkpoint cadence, train.steps upward); never model or tokenizer keys")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 model.d_model=128")
    args = parser.parse_args(argv)
    from lmadapt.run.stopflag import StopFlag  # light: SIGTERM while JAX imports or compiles still exits 0

    with StopFlag() as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop) -> int:

    # Imported late so that `--help` and config errors answer without initialising JAX.
    from lmadapt.checkpoint import CheckpointError
    from lmadapt.config import ConfigError, load_config
    from lmadapt.data import DataError
    from lmadapt.lineage.store import LineageError
    from lmadapt.run.guards import TrainingError
    from lmadapt.session import dry_run
    from lmadapt.trainer import train

    try:
        cfg = load_config(args.config, args.overrides)

        if args.dry_run:
            print(dry_run(cfg))
        elif cfg.stages:
            from lmadapt.stages import run_stages

            run_stages(args.config, args.overrides, stop=stop)
        else:
            train(cfg, stop=stop, allow_config_change=tuple(filter(None, args.allow_config_change.split(","))))
    except (ConfigError, DataError, LineageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError) as e:
        _settle()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the disk filled up while writing logs: the message names the file
        _settle()
        print(f"error: {e}; completed checkpoints are intact", file=sys.stderr)
        return 1
    return 0


def _settle(seconds: float = 3.0) -> None:
    """Let worker threads still unwinding a failed save finish first: Orbax's print tracebacks as they end, and
    one printed while the error line is written splices into it (seen under load when the disk filled up)."""
    import threading
    import time

    deadline = time.monotonic() + seconds
    for t in threading.enumerate():
        if t is not threading.current_thread() and t.is_alive():
            t.join(max(0.0, deadline - time.monotonic()))
    sys.stderr.flush()


if __name__ == "__main__":
    from lmadapt.allocator import run_entry_point

    run_entry_point(main)
