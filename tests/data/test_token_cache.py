"""The token cache: one shard per file, reused exactly, resumable, the same tokens from any number of processes."""

import fcntl
import os

import numpy as np
import pytest

from helpers import snapshot
from lmadapt.config import SourceConfig
from lmadapt.data import DataError, corpus_files
from lmadapt.data.sources import read_source
from lmadapt.data.token_cache import tokenize_source
from lmadapt.data.tokenizers import ByteTokenizer, train_bpe
from lmadapt.data.written import Written


def corpus(folder, n_files=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for i in range(n_files):
        docs = ["".join(rng.choice(list("abcdé \n\t"), rng.integers(5, 200))) for _ in range(40)]
        (folder / f"f{i}.txt").write_text("\n\n".join(docs), encoding="utf-8")
    return SourceConfig(name="c", path=str(folder), documents="blank_line")


def tokens(tok_source):
    return np.asarray(tok_source.tokens), tok_source.doc_starts


def test_a_changed_file_or_tokenizer_misses_only_its_own_shards(tmp_path):
    src, cache, tok = corpus(tmp_path / "c"), str(tmp_path / "cache"), ByteTokenizer()
    memory = tokenize_source("c", read_source(src), tok, None)
    first = tokenize_source("c", read_source(src), tok, cache)
    assert first.encoded_files == 4 and not first.cache_hit
    for got in (first, tokenize_source("c", read_source(src), tok, cache)):
        np.testing.assert_array_equal(np.asarray(got.tokens), memory.tokens)
        np.testing.assert_array_equal(got.doc_starts, memory.doc_starts)
    (tmp_path / "c" / "f2.txt").write_text("changed\n\nagain", encoding="utf-8")
    assert tokenize_source("c", read_source(src), tok, cache).encoded_files == 1
    other = train_bpe(["abcdé \n\t" * 50], vocab_size=300)
    assert tokenize_source("c", read_source(src), other, cache).encoded_files == 4
    assert len([n for n in os.listdir(tmp_path / "cache" / "tokens") if not n.startswith(".")]) == 4 + 1 + 4


def test_worker_processes_write_the_same_shards(tmp_path):
    src, tok = corpus(tmp_path / "c", n_files=3), train_bpe(["abcdé \n\t" * 50], vocab_size=300)
    one = tokenize_source("c", read_source(src), tok, str(tmp_path / "one"), workers=1)
    two = tokenize_source("c", read_source(src), tok, str(tmp_path / "two"), workers=2)
    assert two.encoded_files == 3
    np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(two.doc_starts, one.doc_starts)
    for name in sorted(os.listdir(tmp_path / "one" / "tokens")):
        for f in ("tokens.npy", "doc_starts.npy"):
            assert (tmp_path / "one" / "tokens" / name / f).read_bytes() == (tmp_path / "two" / "tokens" / name / f
                                                                             ).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_refused_file_undoes_what_the_run_added(tmp_path, workers):
    src = corpus(tmp_path / "c")
    (tmp_path / "c" / "f3.txt").write_bytes(b"text\0binary")
    cache = tmp_path / "cache"
    cache.mkdir()
    before = snapshot(str(cache))
    written = Written()
    with pytest.raises(DataError, match=r"f3.txt: looks like a binary file \(NUL byte at offset 4\)"):
        try:
            tokenize_source("c", read_source(src), ByteTokenizer(), str(cache), written, workers=workers)
        finally:
            written.undo()
    assert snapshot(str(cache)) == before


def test_an_interrupted_run_keeps_the_files_it_finished(tmp_path, monkeypatch):
    src, cache, tok = corpus(tmp_path / "c"), str(tmp_path / "cache"), ByteTokenizer()
    real, calls = corpus_files.open_content, []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    read = read_source(src)
    monkeypatch.setattr(corpus_files, "open_content", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_source("c", read, tok, cache)
    monkeypatch.undo()
    stale, live = tmp_path / "cache" / "tokens" / ".tmp-killed", tmp_path / "cache" / "tokens" / ".tmp-writing"
    for folder in (stale, live):  # a writer killed mid-shard (its lock free), and one at work (its lock held)
        folder.mkdir()
        (folder / ".lock").touch()
    with open(live / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        again = tokenize_source("c", read_source(src), tok, cache)
    assert again.encoded_files == 2 and not stale.exists() and live.exists()
    np.testing.assert_array_equal(np.asarray(again.tokens), tokenize_source("c", read_source(src), tok, None).tokens)


def test_prepare_data_tokenizes_a_configs_sources_once(tmp_path):
    from helpers import run_cmd

    src = corpus(tmp_path / "c")
    args = ["tools/prepare_data.py", "--config", "configs/tiny.yaml", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.sources.0.path={src.path}", "data.sources.0.documents=blank_line", "--workers", "2"]
    first, again = run_cmd(args), run_cmd(args)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "tokenizing 4 of 4 files" in first.stdout and "in 2 processes" in first.stdout
    summary = [line.split(" MB")[0] for line in (first.stdout + again.stdout).splitlines() if line.startswith("shakes")]
    assert len(summary) == 2 and summary[0] == summary[1] and "all cached" in again.stdout
    bad = run_cmd([*args[:-2], "--workers", "0"])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --workers 0: expected a positive number of processes"
