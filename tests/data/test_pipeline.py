"""The input pipeline: determinism, resume, process sharding, mixtures, caching and bad data."""

import gzip
import json
import lzma
import os

import numpy as np
import pytest

from lmadapt.config import DataConfig, ReplayConfig, SourceConfig, TokenizerConfig
from lmadapt.data import DataError, corpus_files, pipeline, sources
from lmadapt.data.pipeline import assign_slots, build_pipeline

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "hex", "jolly", "boxing", "frogs"]


def write_corpus(path, n_docs, seed, words_per_doc=(20, 120)):
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, rng.integers(*words_per_doc))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def source(name, path, **kw):
    return SourceConfig(name=name, path=str(path), documents=kw.pop("documents", "blank_line"), **kw)


def data_config(tmp_path, sources, **kw):
    return DataConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **kw)


def make(cfg, batch_size=8, seq_len=32, tok=None):
    return build_pipeline(cfg, tok or TokenizerConfig(), batch_size, seq_len)


@pytest.fixture
def two_sources(tmp_path):
    write_corpus(tmp_path / "a.txt", 300, 0)
    write_corpus(tmp_path / "b.txt", 200, 1)
    return [source("a", tmp_path / "a.txt", weight=3.0), source("b", tmp_path / "b.txt", weight=1.0)]


def batches_equal(x, y):
    return all(np.array_equal(x[k], y[k]) for k in x)


def test_same_seed_same_batches_and_resume(tmp_path, two_sources):
    cfg = data_config(tmp_path, two_sources)
    first = make(cfg)
    straight = [first.batch(s) for s in range(12)]
    # A fresh pipeline (as after a restart, now from the cache) resuming at step 7.
    resumed = make(cfg)
    assert all(d["cache_hit"] for d in resumed.describe()["sources"].values())
    for s in range(7, 12):
        assert batches_equal(resumed.batch(s), straight[s])
    other = make(data_config(tmp_path, two_sources, seed=1))
    assert not batches_equal(other.batch(0), straight[0])


def test_processes_together_build_the_global_batch(tmp_path, two_sources):
    p = make(data_config(tmp_path, two_sources))
    for step in (0, 3, 50):
        full = p.batch(step)
        for n_proc in (2, 4):
            rows = 8 // n_proc
            parts = [p.batch(step, slice(i * rows, (i + 1) * rows)) for i in range(n_proc)]
            assert batches_equal({k: np.concatenate([q[k] for q in parts]) for k in full}, full)


def test_mixture_fractions_and_token_accounting(tmp_path, two_sources):
    write_corpus(tmp_path / "old.txt", 200, 2)
    cfg = data_config(tmp_path, two_sources,
                      replay=ReplayConfig(fraction=0.3, sources=[source("old", tmp_path / "old.txt")]))
    p = make(cfg, batch_size=10)
    expected = {"a": 0.7 * 0.75 * 10, "b": 0.7 * 0.25 * 10, "old": 0.3 * 10}
    n = 400
    totals = dict.fromkeys(expected, 0)
    for step in range(n):
        counts = p.source_counts(step)
        assert sum(counts.values()) == 10
        for name, c in counts.items():
            # Each batch holds floor or ceil of a source's expected share...
            assert abs(c - expected[name]) < 1 + 1e-9, (step, counts)
            totals[name] += c
    for name, total in totals.items():
        # ...and over many batches the share is exact to within one row.
        assert abs(total - n * expected[name]) <= 1, (name, total)

    # tokens_seen (closed form) equals the loss tokens of the rows actually drawn.
    slots = np.arange(37 * 10)
    comp, index = assign_slots(slots, p._weights, p._offsets)
    for k, c in enumerate(p.components):
        drawn = c.row_of(index[comp == k])
        assert p.tokens_seen(37)[c.name] == int(c.loss_tokens[drawn].sum())
    assert sum(p.tokens_seen(37).values()) == int(sum(p.batch(s)["loss_mask"].sum() for s in range(37)))


def test_each_row_is_drawn_once_per_epoch(tmp_path):
    write_corpus(tmp_path / "a.txt", 100, 0)
    p = make(data_config(tmp_path, [source("a", tmp_path / "a.txt")]), batch_size=4)
    c = p.components[0]
    n = c.rows.n_rows
    rows = c.row_of(np.arange(2 * n))
    assert sorted(rows[:n]) == list(range(n)) and sorted(rows[n:]) == list(range(n))
    assert not np.array_equal(rows[:n], rows[n:])  # reshuffled every epoch


def test_held_out_documents_are_never_trained_on(tmp_path):
    write_corpus(tmp_path / "a.txt", 200, 0)
    p = make(data_config(tmp_path, [source("a", tmp_path / "a.txt")], val_fraction=0.1))
    train, val = p.components[0].rows, p.val["a"]
    assert train.tokens is val.tokens  # one tokenized source, split by document

    def positions(rows):
        return {i for s, n in zip(rows.piece_start.tolist(), rows.piece_len.tolist(), strict=True)
                for i in range(s, s + n)}

    held_out, trained = positions(val), positions(train)
    assert held_out and not (held_out & trained)
    assert len(held_out) + len(trained) == len(train.tokens) - 200  # every input token is in one split
    # each document held out by its hash: about val_fraction of them (binomial, 20 +- 4.2 expected here)
    assert train.stats.documents + val.stats.documents == 200 and 10 <= val.stats.documents <= 30
    again = make(data_config(tmp_path, [source("a", tmp_path / "a.txt")], val_fraction=0.1))
    assert positions(again.val["a"]) == held_out  # the same documents in every run


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_trained_tokenizer_is_trained_once_and_cached(tmp_path, two_sources, kind, monkeypatch):
    cfg = data_config(tmp_path, two_sources)
    tok_cfg = TokenizerConfig(kind=kind, vocab_size=300)
    p1 = make(cfg, tok=tok_cfg)
    p2 = make(cfg, tok=tok_cfg)
    assert p1.tokenizer.vocab_size == 300 and p1.tokenizer.fingerprint == p2.tokenizer.fingerprint
    cached = tmp_path / "cache" / "tokenizers"
    assert len(list(cached.iterdir())) == 1
    assert batches_equal(p1.batch(3), p2.batch(3))
    text = "the  quick\n\tbrown fox"
    assert p1.tokenizer.decode(p1.tokenizer.encode([text])) == [text]  # lossless
    # The key holds the kind, the settings and a version: a tokenizer trained by older code is not reused.
    monkeypatch.setattr(pipeline, "TRAINED_TOKENIZER_VERSION", pipeline.TRAINED_TOKENIZER_VERSION + 1)
    make(cfg, tok=tok_cfg)
    make(cfg, tok=TokenizerConfig(kind=kind, vocab_size=290))
    make(cfg, tok=TokenizerConfig(kind="bpe" if kind == "sentencepiece" else "sentencepiece", vocab_size=300))
    assert len(list(cached.iterdir())) == 4


def test_prompt_completion_loss_covers_only_the_completion(tmp_path):
    records = [{"prompt": f"Q{i}: what is {i}+{i}? A:", "completion": f" {2 * i}"} for i in range(60)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    src = SourceConfig(name="qa", kind="jsonl", path=str(tmp_path / "qa.jsonl"), format="prompt_completion")
    p = make(data_config(tmp_path, [src]), batch_size=2, seq_len=64)
    tok = p.tokenizer
    b = p.batch(0)
    for r in range(2):
        for s in set(b["segment_ids"][r].tolist()) - {0}:
            span = b["segment_ids"][r] == s
            trained = b["targets"][r][span][b["loss_mask"][r][span] > 0]
            prompt = tok.decode([b["tokens"][r][span]])[0]
            i = int(prompt.split(":")[0][1:])
            assert trained[-1] == tok.eos_id and tok.decode([trained[:-1]])[0] == f" {2 * i}"


def test_classification_records_render_through_the_template(tmp_path):
    lines = [json.dumps({"text": f"item {i}", "label": ["pos", "neg"][i % 2]}) for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines), encoding="utf-8")
    src = SourceConfig(name="c", kind="jsonl", path=str(tmp_path / "c.jsonl"), format="classification",
                       labels=["pos", "neg"], template="Review: {text}\nSentiment:")
    p = make(data_config(tmp_path, [src]), batch_size=2, seq_len=64)
    b = p.batch(0)
    text = p.tokenizer.decode([b["tokens"][0][b["segment_ids"][0] == 1]])[0]
    trained = p.tokenizer.decode([b["targets"][0][(b["segment_ids"][0] == 1) & (b["loss_mask"][0] > 0)]])[0]
    assert text.startswith("Review: item ") and "\nSentiment:" in text
    assert trained in (" pos", " neg")


def test_folders_globs_and_compressed_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("alpha beta gamma\n" * 200, encoding="utf-8")
    with gzip.open(folder / "sub" / "two.txt.gz", "wt", encoding="utf-8") as f:
        f.write("delta epsilon\n" * 200)
    with lzma.open(folder / "three.txt.xz", "wt", encoding="utf-8") as f:
        f.write("zeta eta theta\n" * 200)
    for path in (folder, folder / "**" / "*.*"):
        p = make(data_config(tmp_path, [source("c", path, documents="file")]), batch_size=2)
        files = p.describe()["sources"]["c"]["fingerprint"]["files"]
        assert len(files) == 3 and all(len(f["sha256"]) == 64 for f in files)


def test_stdlib_placeholder_reads_python_source(tmp_path):
    import glob
    import sysconfig

    p = make(data_config(tmp_path, [source("code", "{stdlib}/json/*.py", documents="file")]), batch_size=2)
    n_files = len(glob.glob(sysconfig.get_paths()["stdlib"] + "/json/*.py"))
    assert len(p.describe()["sources"]["code"]["fingerprint"]["files"]) == n_files > 2


def test_tfds_source_through_the_pipeline(tmp_path):
    from lmadapt.data.tfds_builder import prepare_text_dataset

    docs = write_corpus(tmp_path / "a.txt", 120, 3)
    data_dir = tmp_path / "tfds"
    prepare_text_dataset("lmadapt_test_corpus", [str(tmp_path / "a.txt")], str(data_dir), version="1.2.0",
                         documents="blank_line")
    src = SourceConfig(name="t", kind="tfds", dataset="lmadapt_test_corpus:1.2.0", split="train", feature="text",
                       data_dir=str(data_dir))
    p = make(data_config(tmp_path, [src]))
    d = p.describe()["sources"]["t"]
    assert d["fingerprint"]["version"] == "1.2.0" and d["documents"] + p.val["t"].stats.documents == len(docs)
    text = p.tokenizer.decode([p.batch(0)["tokens"][0][p.batch(0)["segment_ids"][0] == 1]])[0]
    assert any(text.lstrip() and text.lstrip()[:20] in doc for doc in docs)
    from lmadapt.data import tfds_source

    real = tfds_source._texts
    tfds_source._texts = lambda *a: pytest.fail("records read on a cache hit")
    try:  # cached: the records are not read again (ArrayRecord sources are read by ranges, when tokenized)
        again = make(data_config(tmp_path, [src]))
    finally:
        tfds_source._texts = real
    assert again.describe()["sources"]["t"]["cache_hit"] and batches_equal(again.batch(2), p.batch(2))


# -- bad data: one clear message (or a counted policy) each ---------------------------------------


def bad(tmp_path, src, match, **kw):
    with pytest.raises(DataError, match=match):
        make(data_config(tmp_path, [src], **kw), **{k: v for k, v in kw.items() if k == "batch_size"})


def test_missing_path(tmp_path):
    bad(tmp_path, source("x", tmp_path / "nope.txt"), r"source 'x': path '.*nope.txt' not found")
    bad(tmp_path, source("x", tmp_path / "*.none"), r"source 'x': '.*\*.none' matches no files")


def test_empty_source(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    bad(tmp_path, source("x", tmp_path / "empty.txt"), r"source 'x': '.*empty.txt' holds no documents")


def test_source_smaller_than_one_batch(tmp_path):
    write_corpus(tmp_path / "small.txt", 3, 0, words_per_doc=(3, 5))
    bad(tmp_path, source("x", tmp_path / "small.txt"), r"source 'x' packs into \d+ training rows of 32 tokens, "
        r"fewer than one batch \(train.batch_size=8\)")


def test_undecodable_bytes_replace_and_count_or_fail(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("caf\xe9 au lait\n\n" * 300).encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 at byte 3"):
        make(data_config(tmp_path, [source("x", path)], decode_errors="fail"))
    p = make(data_config(tmp_path, [source("x", path)]))
    assert p.describe()["sources"]["x"]["replaced_chars"] == 300


def test_a_cache_hit_never_reads_the_text_and_keeps_its_counts(tmp_path, monkeypatch):
    # What keeps a cached run's memory independent of the corpus (issue 20): tokens memory-mapped, text unread.
    path = tmp_path / "latin1.txt"
    path.write_bytes(("caf\xe9 au lait\n\n" * 300).encode("latin-1"))
    os.utime(path, (1e9, 1e9))  # not written just now: its hash is remembered (DigestMemo.RACY_S)
    cfg = data_config(tmp_path, [source("x", path)])
    first = make(cfg)

    def unread(where):
        raise AssertionError(f"{where} was opened on a cache hit")

    monkeypatch.setattr(corpus_files, "open_content", unread)  # neither read nor hashed: the hash is remembered
    again = make(cfg)
    described = again.describe()["sources"]["x"]
    assert described["cache_hit"] and described["replaced_chars"] == 300
    assert batches_equal(again.batch(3), first.batch(3))
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 at byte 3"):  # strict: the cache cannot vouch
        make(data_config(tmp_path, [source("x", path)], decode_errors="fail"))


def test_a_file_that_changes_while_it_is_read_is_named(tmp_path):
    path = tmp_path / "a.txt"
    write_corpus(path, 50, 0)
    read = sources.read_source(source("x", path))
    write_corpus(path, 60, 1)  # after its fingerprint, before its text: the cache key would not name the text
    with pytest.raises(DataError, match=r"source 'x': .*a.txt changed while it was being read"):
        read.documents  # noqa: B018


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', encoding="utf-8")
    bad(tmp_path, SourceConfig(name="j", kind="jsonl", path=str(path)), r"d.jsonl:3: not valid JSON")
    path.write_text('{"body": "x"}\n', encoding="utf-8")
    bad(tmp_path, SourceConfig(name="j", kind="jsonl", path=str(path)), r"d.jsonl:1: no field 'text' \(fields: body\)")


def test_label_outside_the_label_set(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n', encoding="utf-8")
    src = SourceConfig(name="c", kind="jsonl", path=str(path), format="classification", labels=["pos", "neg"])
    bad(tmp_path, src, r"c.jsonl:2: label 'meh' is not in the label set \['pos', 'neg'\] of source 'c'")


def test_long_documents_split_or_truncate_counted(tmp_path):
    write_corpus(tmp_path / "long.txt", 40, 0, words_per_doc=(60, 80))
    split = make(data_config(tmp_path, [source("x", tmp_path / "long.txt")]), batch_size=2)
    trunc = make(data_config(tmp_path, [source("x", tmp_path / "long.txt")], long_docs="truncate"), batch_size=2)
    s, t = split.describe()["sources"]["x"], trunc.describe()["sources"]["x"]
    assert s["split_documents"] == s["documents"] and s["truncated_tokens"] == 0
    assert t["truncated_tokens"] > 0 and t["split_documents"] == 0
    assert s["input_tokens"] == t["input_tokens"] + t["truncated_tokens"]


def test_single_document_source_cannot_hold_out(tmp_path):
    (tmp_path / "one.txt").write_text("word " * 5000, encoding="utf-8")
    bad(tmp_path, source("x", tmp_path / "one.txt", documents="file"),
        r"source 'x' has 1 document; a held-out split needs at least 2")


@pytest.mark.parametrize("prompted_from", [0, 300, None])  # prompts from the start, midway (weights filled in), never
def test_streamed_tokens_equal_the_reference_in_memory_and_on_disk(tmp_path, prompted_from):
    from lmadapt.data.sources import Document, SourceRead
    from lmadapt.data.token_cache import tokenize_source
    from lmadapt.data.tokenizers import ByteTokenizer

    rng = np.random.default_rng(0)
    docs = [Document("".join(rng.choice(list("ab \n\té"), rng.integers(0, 40))),
                     prompt=None if prompted_from is None or i < prompted_from else "q" * int(rng.integers(0, 5)))
            for i in range(700)]  # more than one encode chunk
    tok = ByteTokenizer()
    ids = [[tok.bos_id] * (tok.bos_id >= 0) + list((d.prompt or "").encode()) + list(d.text.encode()) + [tok.eos_id]
           for d in docs]
    context = [(tok.bos_id >= 0) + len((d.prompt or "").encode()) for d in docs]
    supervised = prompted_from is not None
    ref_w = np.concatenate([np.r_[np.zeros(c, np.uint8), np.ones(len(i) - c, np.uint8)]
                            for i, c in zip(ids, context, strict=True)])
    cache = str(tmp_path / "cache")
    for where, hit in ((None, False), (cache, False), (cache, True)):  # memory, disk (cold), disk (hit)
        got = tokenize_source("x", SourceRead(docs, {"n": 1}), tok, where)
        np.testing.assert_array_equal(got.tokens, np.concatenate([np.asarray(i) for i in ids]))
        np.testing.assert_array_equal(np.diff(got.doc_starts), [len(i) for i in ids])
        assert (got.weights is not None) == supervised and got.cache_hit == hit
        if supervised:
            np.testing.assert_array_equal(got.weights, ref_w)
    assert [n for n in os.listdir(tmp_path / "cache" / "tokens") if n.startswith(".")] == []  # nothing left aside
