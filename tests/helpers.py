"""Helpers shared by tests: running the entry points as a user would, a tiny model, injected numerical faults,
and texts that trip tokenizers. Tests import what they share from here, never from each other."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lmadapt.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model of the lineage and fault tests: a few thousand params, quick to save, load and step.
TINY_MODEL = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                         dtype="float32")

ISSUE_EXAMPLE = "def f(x):\n    return x  +  1\n\nprint(f(2))"
# Pieces that trip normalising tokenizers: code, whitespace runs, tabs, CRLF, emoji (with ZWJ), CJK,
# combining marks, odd spaces, compatibility characters, and strings that look like tokens.
PIECES = ["def ", "f(x):", "\n", "\n\n", "    ", "\t", "\t\t", "\r\n", "\r", "  ", " ", "return", " x", "  +  ", "1",
          "\U0001F600", "\U0001F469\u200d\U0001F467", "\u6f22\u5b57", "\u304b\u306a", "e\u0301", "n\u0303\u0323",
          "\u00a0", "\u3000", "\ufb01", "\uff21", "\u2126", "<s>", "</s>", "<pad>", "<unk>", "<0x0A>", "\u0120",
          "\u010a", "\u2581", "\x00", "\x7f", "\ufeff", "'s", "1234567"]


def tiny_params(seed: int):
    """Freshly initialised params of `TINY_MODEL` (unboxed), the same for the same seed."""
    from lmadapt.model import init_params

    return nn.unbox(init_params(TINY_MODEL, jax.random.PRNGKey(seed)))


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


def poisoned(params, leaf_path, bad, value=False):
    """`params` with the gradient (or, with `value`, the value) of one leaf made NaN when `bad` is true;
    must be applied inside the differentiated function."""

    @jax.custom_vjp
    def nan_grad(x, flag):
        return x

    nan_grad.defvjp(lambda x, flag: (x, flag), lambda flag, g: (jnp.where(flag, jnp.nan, g), None))

    def poison(path, x):
        if jax.tree_util.keystr(path) != leaf_path:
            return x
        return jnp.where(bad, jnp.nan, x) if value else nan_grad(x, bad)

    return jax.tree_util.tree_map_with_path(poison, params)


def inject_fault(leaf_path, at_step, value=False):
    """Patch the model's forward pass (inside the gradient) so that the step taken at state.step ==
    `at_step` gets a NaN in one leaf's gradient (or value); returns the train_step to jit instead."""
    import lmadapt.train_step as ts

    flag, real_forward, real_step = {}, ts.forward, ts.train_step

    def forward(params, model, batch):
        if "bad" in flag:
            params = poisoned(params, leaf_path, flag["bad"], value)
        return real_forward(params, model, batch)

    def train_step_with_fault(state, batch, **kw):
        flag["bad"] = state.step == at_step  # a tracer, read by forward while this step is traced
        try:
            return real_step(state, batch, **kw)
        finally:
            flag.clear()

    ts.forward = forward
    return train_step_with_fault
