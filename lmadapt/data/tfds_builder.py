"""Turn local text files into a versioned tensorflow-datasets dataset, written as ArrayRecord without TensorFlow.

    prepare_text_dataset("my_corpus", ["corpus/*.txt.xz"], "/data/tfds", version="1.0.0", val_fraction=0.05)

gives `/data/tfds/my_corpus/1.0.0/` with splits `train` (and `validation` when val_fraction > 0), one example
per document with a single feature `text`. Read it back with `lmadapt.data.tfds_source.read_tfds_texts`.

Records are stored in document order (files sorted by path, then documents within a file), not in tfds's usual
key-hash order: the training pipeline shuffles by its own seed, and a stored order that matches the sources keeps
the dataset easy to audit.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import lzma
import os
import re
import sys
import tempfile
import types
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import tensorflow_datasets as tfds

from lmadapt.data import DataError

DOCUMENT_MODES = ("file", "blank_line")
TEXT_FEATURE = "text"

# Stricter than tfds's own name regex: no upper case (tfds would snake-case a class name) and nothing that
# `tfds.builder` parses as namespace, config, version or kwargs (":", "/", "=").
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+\Z")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_files(patterns: list[str]) -> list[str]:
    """Absolute paths of the files named or matched by `patterns` (globs, `**` allowed), sorted and deduplicated.

    Sorting makes the built dataset independent of the order the files were given in.
    """
    if not patterns:
        raise DataError("no input files given")
    found: set[str] = set()
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern):
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise DataError(f"no files matched {pattern!r}")
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern} is a directory; pass files or a glob such as '{pattern}/*.txt'")
        elif not os.path.isfile(pattern):
            raise DataError(f"no files matched {pattern!r} (no such file)")
        else:
            matches = [pattern]
        found.update(os.path.abspath(p) for p in matches)
    return sorted(found)


def open_binary(path: str) -> BinaryIO:
    """Open a plain, `.gz` or `.xz` file for reading bytes, decompressing by file name."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def iter_documents(path: str, documents: str) -> Iterator[str]:
    """The non-blank documents of one UTF-8 file: the whole file, or each run of non-blank lines ("blank_line").

    Line ends become "\\n". A blank_line document keeps its lines, minus the newline that ends its last line.
    Unreadable files (bad UTF-8, corrupt or truncated compression) raise DataError naming the file and line.
    """
    try:
        with open_binary(path) as f:
            if documents == "file":
                text = _decode(f.read(), path)
                if text.strip():
                    yield text
                return
            # Bytes lines decoded one by one, not a text stream: a decoding error then knows its line.
            block: list[str] = []
            for line_no, raw in enumerate(f, 1):
                line = _decode(raw, path, line_no)
                if line.strip():
                    block.append(line)
                elif block:
                    yield _join_block(block)
                    block = []
            if block:
                yield _join_block(block)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _decode(data: bytes, path: str, line_no: int | None = None) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_no if line_no is not None else data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({e.reason})") from e
    if line_no in (None, 1):
        text = text.removeprefix("\ufeff")  # a byte order mark is encoding, not text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _join_block(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def count_documents(paths: list[str], documents: str) -> list[int]:
    """Documents per file. Reading everything once up front surfaces bad input before tfds writes anything."""
    return [sum(1 for _ in iter_documents(p, documents)) for p in paths]


def choose_validation(num_docs: int, val_fraction: float, seed: int) -> frozenset[int]:
    """Ordinals of the held-out documents: round(num_docs * val_fraction) of them (at least one), drawn by seed."""
    if val_fraction <= 0:
        return frozenset()
    num_val = max(1, round(num_docs * val_fraction))
    if num_val >= num_docs:
        raise DataError(f"val_fraction={val_fraction} of {num_docs} document(s) leaves no training documents")
    rng = np.random.default_rng(seed)
    return frozenset(int(i) for i in rng.choice(num_docs, size=num_val, replace=False))


class _TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Examples {"text": document} from local files; `_builder_class` makes a subclass per dataset name/version.

    Registration is skipped so that building the same name twice in one process is allowed, and so that reading
    the dataset back goes through its files (dataset_info.json), not through this code.
    """

    def __init__(self, *, paths: list[str], counts: list[int], documents: str, held_out: frozenset[int],
                 metadata: dict, **kwargs):
        self._paths = paths
        self._counts = counts
        self._documents = documents
        self._held_out = held_out
        self._metadata = metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not dataset_info_from_configs: that reads README/CITATIONS files next to the
        # builder's module, which a dynamically made builder does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text documents ({self._documents} mode) from {len(self._paths)} local file(s).",
            features=tfds.features.FeaturesDict({TEXT_FEATURE: tfds.features.Text()}),
            # Keys are document ordinals; unshuffled storage keeps the records in document order.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self._metadata),  # saved as metadata.json
        )

    def _split_generators(self, dl_manager):
        splits = {"train": self._generate_examples(held_out=False)}
        if self._held_out:
            splits["validation"] = self._generate_examples(held_out=True)
        return splits

    def _generate_examples(self, held_out: bool):
        ordinal = 0
        for path, count in zip(self._paths, self._counts, strict=True):
            start = ordinal
            for text in iter_documents(path, self._documents):
                if (ordinal in self._held_out) == held_out:
                    yield ordinal, {TEXT_FEATURE: text}
                ordinal += 1
            # The held-out draw was made on the counts; a file edited since would shift every later document.
            if ordinal - start != count:
                raise DataError(f"{path} changed while the dataset was being built")


def _builder_class(name: str, version: str) -> type[_TextFilesBuilder]:
    """A builder subclass named `name` at `version`: tfds takes both from the class, not the instance."""
    class_name = "".join(part.capitalize() for part in name.split("_")) or "TextFiles"
    namespace = {"name": name, "VERSION": tfds.core.Version(version), "RELEASE_NOTES": {version: "Built by lmadapt."},
                 "__module__": __name__}
    return types.new_class(class_name, (_TextFilesBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(namespace))


def check_name_and_version(name: str, version: str) -> None:
    """Raise DataError unless `name` is a usable tfds dataset name and `version` is MAJOR.MINOR.PATCH."""
    if not _NAME_RE.match(name):
        raise DataError(f"bad dataset name {name!r}: use lower case letters, digits and '_', starting with a letter")
    if not _VERSION_RE.match(version):
        raise DataError(f"bad version {version!r}: use MAJOR.MINOR.PATCH, e.g. '1.0.0'")
    # tfds.builder(name) would pick the catalog's code over our files, so reading back could silently go wrong.
    if name in tfds.list_builders(with_community_datasets=False):
        raise DataError(f"dataset name {name!r} is taken by the tensorflow-datasets catalog; choose another name")


def prepare_text_dataset(name: str, files: list[str], data_dir: str, version: str = "1.0.0",
                         documents: str = "file", val_fraction: float = 0.0, seed: int = 0) -> str:
    """Build tfds dataset `name:version` in `data_dir` from local text files; return the dataset directory.

    files: paths or globs of UTF-8 text files, plain, .gz or .xz. documents: "file" (one document per file) or
    "blank_line" (documents separated by blank lines); blank documents are dropped. val_fraction: share of
    documents held out, by `seed`, as split "validation". Refuses to overwrite an existing version.
    """
    check_name_and_version(name, version)
    if documents not in DOCUMENT_MODES:
        raise DataError(f"documents must be one of {', '.join(DOCUMENT_MODES)}, not {documents!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), not {val_fraction}")
    dataset_dir = os.path.join(os.path.abspath(data_dir), name, version)
    if os.path.exists(dataset_dir):
        raise DataError(f"dataset {name}:{version} already exists at {dataset_dir}; refusing to overwrite it "
                        "(choose a new version)")

    paths = expand_files(files)
    counts = count_documents(paths, documents)
    if sum(counts) == 0:
        raise DataError(f"no documents in {len(paths)} file(s): all are empty or blank")
    held_out = choose_validation(sum(counts), val_fraction, seed)
    sources = [{"path": p, "bytes": os.path.getsize(p), "documents": n} for p, n in zip(paths, counts, strict=True)]
    metadata = {"source_files": sources, "documents": documents, "val_fraction": val_fraction, "seed": seed}
    builder = _builder_class(name, version)(data_dir=os.path.abspath(data_dir), file_format="array_record",
                                            paths=paths, counts=counts, documents=documents, held_out=held_out,
                                            metadata=metadata)
    _build(builder)
    return dataset_dir


def _build(builder: tfds.core.DatasetBuilder) -> None:
    """download_and_prepare with nothing fetched from anywhere and no `downloads/` left in data_dir."""
    config = tfds.download.DownloadConfig(try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)
    # tfds prints its progress messages to stdout; callers (the CLI) keep stdout for their own results.
    with tempfile.TemporaryDirectory(prefix="lmadapt-tfds-") as download_dir, contextlib.redirect_stdout(sys.stderr):
        try:
            builder.download_and_prepare(download_dir=download_dir, download_config=config)
        except DataError:
            raise
        except Exception as e:  # tfds wraps errors in many types; callers handle one
            raise DataError(f"building {builder.name}:{builder.version} in {builder.data_dir_root} failed: "
                            f"{type(e).__name__}: {e}") from e
