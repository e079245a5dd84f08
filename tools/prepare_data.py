"""Turn local text files into a versioned tensorflow-datasets dataset (ArrayRecord; TensorFlow not needed).

    python tools/prepare_data.py --name my_corpus --version 1.0.0 --data-dir DIR \
        [--documents file|blank_line] [--val-fraction 0.05] [--seed 0] FILES_OR_GLOBS...

Prints the dataset directory and the number of examples per split. Quote globs so the shell leaves them to
this script ('corpus/**/*.txt.xz'). An existing name+version is never overwritten: pick a new version.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmadapt.data import DataError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: dataset identity, where to write it, how to cut documents, and the input files."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="dataset name: lower case letters, digits and '_'")
    p.add_argument("--version", default="1.0.0", help="dataset version, MAJOR.MINOR.PATCH (default 1.0.0)")
    p.add_argument("--data-dir", required=True, help="tfds data_dir to write NAME/VERSION/ into")
    p.add_argument("--documents", choices=["file", "blank_line"], default="file",
                   help="one document per file, or documents separated by blank lines (default file)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of documents held out as split 'validation' (default 0: no validation split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
    p.add_argument("files", nargs="+", metavar="FILES_OR_GLOBS", help="text files (plain, .gz, .xz) or globs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the dataset and report it; exit 2 with `error: ...` on a data problem."""
    args = parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
