"""Read the text of a tensorflow-datasets dataset already prepared in a local data_dir, without TensorFlow.

ArrayRecord datasets are read through `tfds.data_source` (random access, no TensorFlow). A dataset prepared as
tfrecord needs TensorFlow: it is read with `tfds.load` when TensorFlow is importable, else refused with a message
saying how to re-prepare it. Nothing is ever downloaded or prepared here.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from lmadapt.data import DataError
from lmadapt.files.paths import dir_problem, walk_files

# Records fetched per `__getitems__` call: batched reads are much faster than one `source[i]` at a time, and
# chunking bounds the memory held in decoded example dicts.
_READ_CHUNK = 4096


def read_tfds_texts(name: str, split: str, feature: str, data_dir: str | None) -> tuple[list[str], dict]:
    """All records' `feature` of split `split` of tfds dataset `name` (e.g. "my_corpus" or "my_corpus:1.0.0").

    Texts come back as str, in record order. The fingerprint dict names the resolved version, split, feature,
    example count and the record files read (basename and size). `data_dir=None` means tfds's default data dir.
    Every failure raises DataError.
    """
    if (lazy := open_tfds_texts(name, split, feature, data_dir)) is not None:
        n, fingerprint, read = lazy
        return read(0, n), fingerprint
    builder = _open_builder(name, data_dir)
    info = builder.info
    split_info = _split_info(info, split)
    if importlib.util.find_spec("tensorflow") is not None:
        texts = _read_with_tensorflow(name, split, feature, data_dir)
    else:
        stored_as = info.file_format.value if info.file_format else "an unknown file format"
        raise DataError(f"dataset {_describe(info)} in {builder.data_dir} is stored as {stored_as}, "
                        "which needs TensorFlow to read; re-prepare it with file_format='array_record' "
                        "(e.g. `tfds build --file_format=array_record`) or install tensorflow")
    return texts, _fingerprint(info, split, feature, len(texts), split_info.filepaths)


def open_tfds_texts(name: str, split: str, feature: str, data_dir: str | None
                    ) -> tuple[int, dict, Callable[[int, int], list[str]]] | None:
    """(record count, fingerprint, read(start, stop) -> those records' `feature`) of an ArrayRecord dataset, read
    lazily by range; None for a dataset without random access (read whole with `read_tfds_texts`)."""
    builder = _open_builder(name, data_dir)
    info = builder.info
    split_info = _split_info(info, split)
    _check_feature(info, feature)
    if not _has_random_access(info):
        return None
    source = _data_source(name, split, data_dir)
    dataset = _describe(info)

    def read(start: int, stop: int) -> list[str]:
        return _texts(source, feature, dataset, start, stop)

    return len(source), _fingerprint(info, split, feature, len(source), split_info.filepaths), read


def split_sizes(name: str, data_dir: str | None) -> dict[str, int]:
    """{split: number of examples} of a prepared tfds dataset, from its dataset_info.json (no records read)."""
    info = _open_builder(name, data_dir).info
    return {split: info.splits[split].num_examples for split in sorted(info.splits.keys())}


def _open_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The builder of a dataset prepared in data_dir; DataError (listing what is there) when there is none."""
    if data_dir is not None and (problem := dir_problem(data_dir)) is not None:
        raise DataError(f"tfds data_dir {data_dir} {'does not exist' if problem == 'not found' else problem}")
    _refuse_special_files(name, data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, a malformed name, a catalog builder failing to import, ...
        raise DataError(_not_found_message(name, data_dir)) from e
    # A catalog dataset's builder exists as code even where its data was never prepared.
    if not builder.is_prepared():
        raise DataError(_not_found_message(name, data_dir))
    return builder


def _refuse_special_files(name: str, data_dir: str | None) -> None:
    """tfds opens dataset_info.json and the record files blindly: a pipe among them would block forever, a
    device never end. The dataset's own folder is small (a few files a version), so all of it is checked."""
    root = data_dir if data_dir is not None else os.path.expanduser(tfds.core.constants.DATA_DIR)
    dataset = name.split(":", 1)[0]
    if not re.fullmatch(r"\w+(/[\w.-]+)?", dataset) or ".." in dataset:
        return  # not a dataset name tfds accepts; it refuses it itself
    folder = os.path.join(root, dataset)
    if dir_problem(folder) is not None:
        return  # nothing prepared there: tfds says so, listing what is
    try:
        for found in walk_files(folder):
            if found.problem not in (None, "is a dangling symlink", "not found"):
                raise DataError(f"tfds dataset {name!r}: {found.path} {found.problem}")
    except OSError as e:
        raise DataError(f"tfds dataset {name!r}: cannot list folder {e.filename or folder} ({e.strerror})") from None


def _not_found_message(name: str, data_dir: str | None) -> str:
    where = data_dir if data_dir is not None else f"the default tfds data_dir {tfds.core.constants.DATA_DIR}"
    available = prepared_datasets(data_dir if data_dir is not None else tfds.core.constants.DATA_DIR)
    listing = ", ".join(f"{n}:{v}" for n, versions in sorted(available.items()) for v in versions) or "none"
    return f"tfds dataset {name!r} is not prepared in {where} (datasets there: {listing})"


def prepared_datasets(data_dir: str) -> dict[str, list[str]]:
    """{dataset name (or name/config): [versions]} of the datasets prepared directly under data_dir."""
    found: dict[str, list[str]] = {}
    if not os.path.isdir(data_dir):
        return found
    for dataset in sorted(os.listdir(data_dir)):
        dataset_dir = os.path.join(data_dir, dataset)
        if not os.path.isdir(dataset_dir):
            continue
        # Versions sit right under the dataset, or one level down under a builder config.
        for prefix, parent in [(dataset, dataset_dir)] + [
                (f"{dataset}/{c}", os.path.join(dataset_dir, c)) for c in sorted(os.listdir(dataset_dir))
                if os.path.isdir(os.path.join(dataset_dir, c))]:
            versions = [v for v in sorted(os.listdir(parent))
                        if os.path.isfile(os.path.join(parent, v, "dataset_info.json"))]
            if versions:
                found[prefix] = versions
    return found


def _describe(info: tfds.core.DatasetInfo) -> str:
    return f"{_dataset_name(info)}:{info.version}"


def _dataset_name(info: tfds.core.DatasetInfo) -> str:
    return f"{info.name}/{info.config_name}" if info.config_name else info.name


def _split_info(info: tfds.core.DatasetInfo, split: str):
    """The (sub)split `split` names, e.g. "train" or "train[:10%]+validation"; DataError listing the splits."""
    available = ", ".join(sorted(info.splits.keys())) or "none"
    # Base split names of a split expression: parts joined by "+", each maybe sliced with "[...]".
    for base in (re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")):
        if base not in info.splits:
            raise DataError(f"split {base!r} not found in tfds dataset {_describe(info)}; available splits: "
                            f"{available}")
    try:
        return info.splits[split]
    except Exception as e:  # a malformed slice: tfds's message says what is wrong with it
        raise DataError(f"bad split {split!r} for tfds dataset {_describe(info)}: {str(e).splitlines()[-1]}") from e


def _check_feature(info: tfds.core.DatasetInfo, feature: str) -> None:
    features = info.features
    names = list(features.keys()) if features is not None else []
    if feature not in names:
        raise DataError(f"feature {feature!r} not found in tfds dataset {_describe(info)}; available features: "
                        f"{', '.join(names) or 'none'}")
    if not _is_text_feature(features[feature]):
        raise DataError(f"feature {feature!r} of tfds dataset {_describe(info)} is not text: {features[feature]}")


def _is_text_feature(feature) -> bool:
    if isinstance(feature, tfds.features.Text):
        return True
    # A scalar string Tensor feature holds text too (some catalog datasets use it instead of Text).
    dtype = getattr(feature, "np_dtype", None)
    return getattr(feature, "shape", None) == () and dtype is not None and np.dtype(dtype) == np.dtype(object)


def _has_random_access(info: tfds.core.DatasetInfo) -> bool:
    random_access = set(tfds.core.file_adapters.FileFormat.with_random_access())
    return bool(set(info.available_file_formats()) & random_access)


def _data_source(name: str, split: str, data_dir: str | None):
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # checked above already; this is for what is left, e.g. missing record files
        raise DataError(f"cannot open tfds dataset {name!r} split {split!r} in {data_dir}: "
                        f"{type(e).__name__}: {e}") from e


def _texts(source, feature: str, dataset: str, first: int = 0, stop: int | None = None) -> list[str]:
    """The feature of records [first, stop) (default: all) as str, reading in chunks."""
    texts: list[str] = []
    n = len(source) if stop is None else stop
    try:
        for start in range(first, n, _READ_CHUNK):
            records = source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
            texts.extend(_as_str(r[feature], dataset, start + i) for i, r in enumerate(records))
    except DataError:
        raise
    except Exception as e:  # corrupt or truncated record files
        raise DataError(f"cannot read tfds dataset {dataset}: {type(e).__name__}: {e}") from e
    return texts


def _as_str(value, dataset: str, index: int) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"tfds dataset {dataset}: record {index} is not valid UTF-8 ({e.reason})") from e


def _read_with_tensorflow(name: str, split: str, feature: str, data_dir: str | None) -> list[str]:
    """tfrecord-only datasets, when TensorFlow is installed: sequential read through tf.data."""
    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
        return [_as_str(ex[feature], name, i) for i, ex in enumerate(tfds.as_numpy(dataset))]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read tfds dataset {name!r} split {split!r} with TensorFlow: "
                        f"{type(e).__name__}: {e}") from e


def _fingerprint(info: tfds.core.DatasetInfo, split: str, feature: str, num_examples: int, paths) -> dict:
    try:
        files = [{"name": os.path.basename(os.fspath(p)), "bytes": os.path.getsize(os.fspath(p))}
                 for p in sorted(set(paths))]
    except OSError as e:
        raise DataError(f"tfds dataset {_describe(info)}: record file missing: {e}") from e
    return {"kind": "tfds", "name": _dataset_name(info), "version": str(info.version), "split": split,
            "feature": feature, "num_examples": num_examples, "files": files}
