"""Helpers shared by tests that run the entry points as a user would."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cmd(args: list[str], env: dict | None = None, timeout: float = 300):
    """Run a Python entry point of this repo in a subprocess with the test environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(*roots: str) -> dict[str, object]:
    """Every folder and file under `roots` (size and sha256 of files); a missing root is recorded as missing."""
    out: dict[str, object] = {}
    for root in roots:
        if not os.path.exists(root):
            out[root] = None
            continue
        if os.path.isfile(root):
            paths = [root]
        else:
            paths = [root]
            for d, dirs, files in os.walk(root):
                paths += [os.path.join(d, x) for x in dirs + files]
        for p in paths:
            if os.path.isdir(p):
                out[p] = "dir"
            elif not os.path.isfile(p):  # a pipe would block the read: record that it is there
                out[p] = "special"
            else:
                with open(p, "rb") as f:
                    blob = f.read()
                out[p] = (len(blob), hashlib.sha256(blob).hexdigest())
    return out


def call_out(main, argv: list[str]) -> tuple[int, str, str]:
    """Run an entry point's `main` in process: (return code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def call(main, argv: list[str]) -> tuple[int, str]:
    """Run an entry point's `main` in process: (return code, what it wrote to stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def assert_one_line(message: str, *needles: str) -> None:
    assert message and "\n" not in message and "\r" not in message, repr(message)
    for n in needles:
        assert n in message, f"{n!r} not in {message!r}"


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A small tmpfs at `path` (root only: CI and this image run as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def write_raw_safetensors(path: str, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file of any dtype code: name -> (code, shape, raw bytes)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (code, shape, blob) in tensors.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blob for _, _, blob in tensors.values()))
