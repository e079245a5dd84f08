#!/usr/bin/env bash
# A second environment for fast CPU training: Python 3.12 with jax >= 0.11, whose CPU backend runs bf16 dots on
# the BF16 units (AVX512-BF16, AMX) that jax 0.10 (the newest on Python 3.11) leaves unused. No torch in it: the
# CPU torch wheel is for Python 3.11, so the HF/torch tests and export checks stay in .venv.
#
#   bash tools/make_jax_env.sh            # -> .venv-jax   (PYTHON=/path/to/python3.12 to choose the interpreter)
#   .venv-jax/bin/python train.py --config configs/tiny.yaml
#   python tools/bench_vs_torch.py --jax-python .venv-jax/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
    for candidate in python3.12 python3.13 "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python"; do
        # a pyenv shim exists for every installed version but runs only the selected ones: try each
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
            py="$candidate"; break
        fi
    done
fi
if [ -z "$py" ] || ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    echo "error: no Python >= 3.12 found (set PYTHON=/path/to/python3.12); jax >= 0.11 needs it" >&2
    exit 2
fi
"$py" -m venv .venv-jax
.venv-jax/bin/pip install -q -e ".[dev]" "jax>=0.11" "safetensors>=0.4,<1"  # safetensors: HF import, no torch
.venv-jax/bin/python -c 'import jax; print(f"jax {jax.__version__} on Python", __import__("sys").version.split()[0])'
