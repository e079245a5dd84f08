"""Tokenizing a source's files in worker processes, one shard per file.

Each worker is `python -m lmadapt.data.tokenize_workers`, sent its jobs (a file to read, the shard to write) as
JSON on stdin and answering one JSON line per shard on stdout: plain JSON across the pipe, never pickle; the
tokenizer travels as the files its `save` writes and is checked by fingerprint. Processes rather than threads:
reading, decoding, cutting documents and turning token lists into arrays is Python, one core a process, and the
tokenizers' own threads are capped so that the processes share the cores instead of oversubscribing them.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from typing import Any

from lmadapt.data import DataError
from lmadapt.data.sources import Unit
from lmadapt.data.token_cache import staging, sweep
from lmadapt.data.tokenizers import Tokenizer


class WorkerError(DataError):
    """A tokenizing worker process that died (killed, out of memory, a bug): not a problem of the data, so the
    shards finished so far are kept."""


def run_workers(todo: list[tuple[str, Unit]], tokenizer: Tokenizer, n: int, root: str, writer: str) -> None:
    """Encode each (shard path, unit) in `n` processes, each shard marked with `writer`. A data error in any
    worker stops them all and is raised here as it was worded there; a worker that dies raises WorkerError."""
    with staging(root) as tokdir:
        _run(todo, tokenizer, n, root, writer, tokdir)


def _run(todo: list[tuple[str, Unit]], tokenizer: Tokenizer, n: int, root: str, writer: str, tokdir: str) -> None:
    procs: list[subprocess.Popen] = []
    try:
        tokenizer.save(tokdir)
        loads: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        sizes = [0] * n
        for entry, unit in sorted(todo, key=lambda t: -t[1].size):  # largest first, to the least loaded
            k = sizes.index(min(sizes))
            loads[k].append({**(unit.job or {}), "entry": entry, "key": unit.key})
            sizes[k] += unit.size
        threads = max(1, len(os.sched_getaffinity(0)) // n)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "LMADAPT_ENCODE_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        lines: queue.Queue = queue.Queue()
        for k, jobs in enumerate(loads):
            err = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process below
            p = subprocess.Popen([sys.executable, "-m", "lmadapt.data.tokenize_workers"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            p.err = err  # type: ignore[attr-defined]
            procs.append(p)
            threading.Thread(target=_forward, args=(k, p, lines), daemon=True).start()
            p.stdin.write(json.dumps({"tokenizer": tokdir, "fingerprint": tokenizer.fingerprint, "jobs": jobs,
                                      "writer": writer}))
            p.stdin.close()
        _collect(procs, lines)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.err.close()  # type: ignore[attr-defined]
        sweep(root)  # what a worker stopped mid-shard left aside


_MARK = "LMADAPT-WORKER "  # the protocol's lines; anything else a library prints is not ours


def _forward(k: int, p: subprocess.Popen, lines: queue.Queue) -> None:
    for line in p.stdout:
        if line.startswith(_MARK):
            lines.put((k, line[len(_MARK):]))
    lines.put((k, None))


def _collect(procs: list[subprocess.Popen], lines: queue.Queue) -> None:
    running = len(procs)
    while running:
        k, line = lines.get()
        if line is None:
            running -= 1
            if procs[k].wait() != 0:
                raise WorkerError(_failure(procs[k]))
            continue
        msg = json.loads(line)
        if "error" in msg:
            raise DataError(msg["error"])


def _failure(p: subprocess.Popen) -> str:
    p.err.seek(0)  # type: ignore[attr-defined]
    tail = [line for line in p.err.read().decode(errors="replace").splitlines() if line.strip()]  # type: ignore
    return f"a tokenizing worker process stopped with exit code {p.returncode}: {tail[-1] if tail else 'no message'}"


def main() -> int:
    """Worker: read the request from stdin, write each job's shard, answer a line per shard."""
    from lmadapt.data.sources import read_job
    from lmadapt.data.token_cache import write_shard
    from lmadapt.data.tokenizers import load_tokenizer

    req = json.load(sys.stdin)
    try:
        tokenizer = load_tokenizer(req["tokenizer"])
        if tokenizer.fingerprint != req["fingerprint"]:
            raise DataError(f"the tokenizer saved for the workers reads back as {tokenizer.fingerprint}, "
                            f"not {req['fingerprint']}")
        for job in req["jobs"]:
            write_shard(read_job(job), job["key"], tokenizer, job["entry"], req["writer"])
            print(_MARK + json.dumps({"entry": job["entry"]}), flush=True)
    except (DataError, ValueError) as e:  # TokenizerError is a ValueError
        print(_MARK + json.dumps({"error": str(e)}), flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
