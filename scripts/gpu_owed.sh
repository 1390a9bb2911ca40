#!/usr/bin/env bash
# The GPU figures still owed, in one go, for a session that is lent a GPU machine (about 15 device
# minutes). Random-weight shapes: nothing to carry but the checkout (and transformers/peft where
# the image lacks koff's versions: scripts/offline_kit.sh). Results land in OUT (default $OUT, the
# folder the device tool brings back) with the command, machine and commit each benchmark records.
#
#   KOFF_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_owed.sh [OUT]
#
# Decoding (bench/decode.py): Llama-3.2-1B and Llama-3.1-8B shapes in bf16, batch 1 and 16 (one
# memory and 4 mixed), koff against transformers' generate, with weights read per second against
# the device's bandwidth. llama.cpp is left out there (its Python binding is built for the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:?give OUT or set \$OUT}}
mkdir -p "$out"
python bench/decode.py --shapes llama-3.2-1b llama-3.1-8b --device cuda --dtype bfloat16 --no-llama-cpp \
    --out "$out" --name decode-gpu
