"""Host peak memory of Hugging Face import and export, for a random checkpoint of a real model's shape.

    python tools/bench_hf_memory.py --dir /tmp/hf-1b [--shape llama3.2-1b] [--dtype bfloat16]

Writes a random checkpoint of the shape (streamed, sharded as transformers would), then measures, each in a
fresh process (peak RSS, VmHWM, of that process alone): the Python + JAX baseline, `open_hf(dir).load()` to host
numpy, `load(target)` onto 8 fake CPU devices (fsdp), and `export_hf` of the loaded params. Prints one JSON line
per phase with the peak and its ratio to the model's bytes in the stored dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAPES = {
    "llama3.2-1b": dict(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, d_ff=8192, max_seq_len=8192, tie_embeddings=True, rope_theta=500000.0),
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         d_ff=4864, max_seq_len=8192, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6),
}


def _peak_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _model_cfg(shape: str, dtype: str):
    from lmadapt.config import ModelConfig

    return ModelConfig(**SHAPES[shape], param_dtype=dtype)


def write_checkpoint(directory: str, shape: str, dtype: str) -> None:
    """A random checkpoint, one tensor generated at a time (never the whole model in memory)."""
    import numpy as np

    from lmadapt.hf.common import CONFIG_FILE, DTYPES, INDEX_FILE, write_json
    from lmadapt.hf.configs import config_to_hf
    from lmadapt.hf.rules import hf_tensors, rules_for
    from lmadapt.hf.safetensors_io import StreamingWriter, dtype_code, index_json, plan_shards, shard_names

    cfg = _model_cfg(shape, dtype)
    os.makedirs(directory)
    tensors = list(hf_tensors(rules_for(cfg)))
    specs = [(name, dtype_code(DTYPES[dtype]), hf_shape) for name, hf_shape, _ in tensors]
    shards = plan_shards(specs, 10**9)
    rng = np.random.default_rng(0)
    for file, idx in zip(shard_names(len(shards)), shards, strict=True):
        with StreamingWriter(os.path.join(directory, file), [specs[i] for i in idx]) as writer:
            for i in idx:
                name, hf_shape, _ = tensors[i]
                writer.write(name, rng.standard_normal(hf_shape, dtype=np.float32) * 0.02)
    if len(shards) > 1:
        write_json(os.path.join(directory, INDEX_FILE), index_json(specs, shards))
    write_json(os.path.join(directory, CONFIG_FILE), config_to_hf(cfg, dtype))
    from lmadapt.data.tokenizers import ByteTokenizer

    ByteTokenizer().save(directory)


def phase(name: str, directory: str) -> dict:
    """Run one measured phase in this process; return its figures."""
    import jax
    from flax import linen as nn

    from lmadapt.hf import export_hf, open_hf

    start = time.perf_counter()
    ckpt = open_hf(directory)
    model_bytes = sum(info.nbytes for info in ckpt.tensors.values())
    if name == "host":
        params = ckpt.load()
    elif name in ("device", "export"):
        from lmadapt import sharding
        from lmadapt.config import MeshConfig
        from lmadapt.model import init_params

        mesh, rules = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)), MeshConfig().rules
        boxed = jax.eval_shape(lambda: init_params(ckpt.config, jax.random.key(0)))
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                              sharding.tree_shardings(boxed, mesh, rules))
        params = ckpt.load(target)
        jax.block_until_ready(params)
        if name == "export":
            loaded_mb, start = _peak_mb(), time.perf_counter()
            export_hf(directory + "-export", params, ckpt.config, dtype=ckpt.config.param_dtype)
    seconds = time.perf_counter() - start
    out = {"phase": name, "peak_rss_mb": round(_peak_mb()), "model_mb": round(model_bytes / 2**20),
           "ratio": round(_peak_mb() * 2**20 / model_bytes, 2), "seconds": round(seconds, 1)}
    if name == "export":
        out["peak_before_export_mb"] = round(loaded_mb)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where the random checkpoint goes (must not exist)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args.phase, args.dir)))
        return 0
    if not os.path.exists(args.dir):
        write_checkpoint(args.dir, args.shape, args.dtype)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    for name in ("baseline", "host", "device", "export"):
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--phase", name],
                                env=env, cwd=ROOT, capture_output=True, text=True)
        print(result.stdout.strip() or result.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
