"""Benchmark the input pipeline at corpus scale: time to the first batch and peak memory, cold and cached.

    python tools/bench_data.py [--sizes 0.1,0.2] [--tokenizer bytes] [--seq 512] [--batch 8]

For each size (GB of text), a corpus is generated on the fly in a temporary folder, never shipped: the
bundled corpora (Shakespeare, the books, the Python docs) and this Python's standard library sources,
repeated until the size is reached, as one plain-text source of blank-line documents in files of
--file-mb MB (0: one file). Each measurement
runs in a fresh process: `build_pipeline` and the first batch with an empty token cache ("cold": read,
tokenize, pack, store) and again with the cache that run filled ("cached"). Reported: seconds to the first
batch, the child's peak RSS (getrusage), and RSS per byte of text. Memory that stays flat as the corpus
grows is what "bounded" means (issue 20); today's cold path holds the text and its tokens in memory.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchinfo import cpu_line  # noqa: E402

CORPORA = ("shakespeare.txt.xz", "books_en.txt.xz", "python_docs.txt.xz")

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from lmadapt.config import DataConfig, SourceConfig, TokenizerConfig
from lmadapt.data.pipeline import build_pipeline
path, cache, kind, batch, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
data = DataConfig(sources=[SourceConfig(name="corpus", path=path, documents="blank_line")], cache_dir=cache)
pipe = build_pipeline(data, TokenizerConfig(kind=kind), batch, seq)
pipe.batch(0)
first = time.perf_counter() - t
d = pipe.describe()["sources"]["corpus"]
print("RESULT " + json.dumps({"first_batch_s": first, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                             "cache_hit": d["cache_hit"], "train_rows": d["train_rows"]}))
"""


def seed_texts() -> list[bytes]:
    """The bundled corpora and the standard library's .py files, as bytes (blank lines between files)."""
    texts = []
    for name in CORPORA:
        with lzma.open(os.path.join(ROOT, "data", name)) as f:
            texts.append(f.read())
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, _, files in os.walk(stdlib):
        for name in sorted(files):
            if name.endswith(".py"):
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        texts.append(f.read().replace(b"\0", b""))
                except OSError:
                    continue
        if sum(map(len, texts)) > 60 * 2**20:
            break
    return texts


def write_corpus(folder: str, size: int, seeds: list[bytes], file_bytes: int) -> int:
    """Write `size` bytes (about) of text into `folder`, cycling through `seeds`, in files of about `file_bytes`
    (0: one file); the bytes written."""
    os.makedirs(folder)
    written, i, f, in_file = 0, 0, None, 0
    while written < size:
        if f is None or (file_bytes and in_file >= file_bytes):
            if f:
                f.close()
            f, in_file = open(os.path.join(folder, f"part-{i:06d}.txt"), "wb"), 0  # noqa: SIM115
        piece = seeds[i % len(seeds)] + b"\n\n"
        f.write(piece)
        written += len(piece)
        in_file += len(piece)
        i += 1
    if f:
        f.close()
    return written


def measure(path: str, cache: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, path, cache, args.tokenizer, str(args.batch), str(args.seq)],
                       capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"error: the pipeline child failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return {**json.loads(line[7:]), "wall_s": time.perf_counter() - t}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1,0.2", help="corpus sizes in GB of text, comma-separated")
    parser.add_argument("--tokenizer", default="bytes", choices=["bytes"], help="bytes: no training, pure pipeline")
    parser.add_argument("--file-mb", type=float, default=20.0, help="MB of text per corpus file (0: one file)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(cpu_line())
    print(f"corpus: {'one file' if not args.file_mb else f'files of {args.file_mb:g} MB'}, tokenizer {args.tokenizer}")
    seeds = seed_texts()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmadapt-bench-data-") as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            path = os.path.join(tmp, f"corpus-{size:g}")
            n = write_corpus(path, int(size * 1e9), seeds, int(args.file_mb * 1e6))
            cache = os.path.join(tmp, f"cache-{size:g}")
            for kind in ("cold", "cached"):
                r = measure(path, cache, args)
                rows.append((n, kind, r))
                print(f"  {n / 1e9:.2f} GB {kind}: first batch {r['first_batch_s']:.1f} s, "
                      f"peak RSS {r['rss'] / 2**30:.2f} GiB", flush=True)
            shutil.rmtree(path)
    print("\n| corpus GB | run | first batch s | peak RSS GiB | RSS / text byte | cache hit |")
    print("|---|---|---|---|---|---|")
    for n, kind, r in rows:
        print(f"| {n / 1e9:.2f} | {kind} | {r['first_batch_s']:.1f} | {r['rss'] / 2**30:.2f} | {r['rss'] / n:.2f} "
              f"| {r['cache_hit']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
