"""Prepare data once, for every run and version after it. Two jobs:

    python tools/prepare_data.py --config CONFIG [key=value ...] [--workers N]

tokenizes every source a run of CONFIG reads (replay sources, and those a forgetting budget may add,
included) into its data.cache_dir, one token shard per file, in N processes (default: one per core). A run
killed meanwhile, or stopped by a bad file, keeps the files it finished: the same command goes on from there.
Training on the config then starts from the cache (and reads only the hashes of the files, remembered by size
and mtime). Prints a line per source: files encoded and cached, documents, training rows, MB of text and MB/s.

    python tools/prepare_data.py --name my_corpus --version 1.0.0 --data-dir DIR \
        [--documents file|blank_line] [--val-fraction 0.05] [--seed 0] FILES_OR_GLOBS...

turns local text files into a versioned tensorflow-datasets dataset (ArrayRecord; TensorFlow not needed) and
prints its directory and the number of examples per split. Quote globs so the shell leaves them to this script
('corpus/**/*.txt.xz'). An existing name+version is never overwritten: pick a new version.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmadapt.data import DataError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: dataset identity, where to write it, how to cut documents, and the input files."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="tokenize this run config's sources into its data.cache_dir (the first job)")
    p.add_argument("--workers", type=int, default=None, help="--config: tokenizing processes (default: one per core)")
    p.add_argument("--name", help="dataset name: lower case letters, digits and '_'")
    p.add_argument("--version", default="1.0.0", help="dataset version, MAJOR.MINOR.PATCH (default 1.0.0)")
    p.add_argument("--data-dir", help="tfds data_dir to write NAME/VERSION/ into")
    p.add_argument("--documents", choices=["file", "blank_line"], default="file",
                   help="one document per file, or documents separated by blank lines (default file)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of documents held out as split 'validation' (default 0: no validation split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
    p.add_argument("files", nargs="*", metavar="FILES_OR_GLOBS",
                   help="text files (plain, .gz, .xz) or globs; with --config: key=value overrides")
    args = p.parse_args(argv)
    if not args.config and not (args.name and args.data_dir and args.files):
        p.error("give --config CONFIG, or --name, --data-dir and the files of a tfds dataset")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the dataset and report it; exit 2 with `error: ...` on a data problem."""
    args = parse_args(argv)
    if args.config:
        return prepare_tokens(args.config, args.files, args.workers)
    # Imported here so that --help answers without loading tensorflow-datasets.
    from lmadapt.data.tfds_builder import prepare_text_dataset
    from lmadapt.data.tfds_source import split_sizes

    try:
        dataset_dir = prepare_text_dataset(args.name, args.files, args.data_dir, version=args.version,
                                           documents=args.documents, val_fraction=args.val_fraction,
                                           seed=args.seed)
        sizes = split_sizes(f"{args.name}:{args.version}", args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(dataset_dir)
    for split, n in sizes.items():
        print(f"{split}: {n} examples")
    return 0


def prepare_tokens(config: str, overrides: list[str], workers: int | None) -> int:
    """Tokenize the sources of a run of `config` into its cache; exit 2 with `error: ...` on a problem."""
    from lmadapt.config import ConfigError, load_config
    from lmadapt.continual.strategy import build as build_strategy
    from lmadapt.data.pipeline import build_pipeline
    from lmadapt.data.tokenizers import TokenizerError
    from lmadapt.lineage.origin import resolve_origin

    try:
        cfg = load_config(config, overrides)
        if cfg.stages:
            raise ConfigError(f"{config} has stages: prepare each stage's config (a stage that starts from a "
                              f"version can be prepared once the version exists; it uses that version's tokenizer)")
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers {workers}: expected a positive number of processes")
        origin = resolve_origin(cfg, write=False)
        cfg = build_strategy(origin.cfg, origin).prepare(origin.cfg)  # e.g. replay sources from the lineage
        data = dataclasses.replace(cfg.data, workers=workers or cfg.data.workers or len(os.sched_getaffinity(0)))
        start = time.perf_counter()
        pipe = build_pipeline(data, cfg.tokenizer, cfg.train.batch_size, cfg.train.seq_len, tokenizer=origin.tokenizer,
                              log=print, steps=cfg.train.steps, keep_replay=True, undo=False)
    except (ConfigError, DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    total = 0.0
    for name, d in pipe.sources.items():
        mb = sum(f.get("bytes", 0) for f in d["fingerprint"].get("files", [])) / 1e6
        total += mb
        print(f"{name}: {d['documents']:,} documents, {d['train_rows']:,} training rows, {mb:,.1f} MB, "
              f"{'all cached' if d['cache_hit'] else 'tokenized'}")
    print(f"prepared in {seconds:.1f} s ({total / max(seconds, 1e-9):,.1f} MB/s) into {data.cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
