#!/usr/bin/env bash
# The GPU figures still owed, in one go, for a session that is lent a GPU machine (about 15 device
# minutes). Results land in OUT (default $OUT, the folder the device tool brings back) with the
# command, machine and commit each benchmark records.
#
#   KOFF_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_owed.sh [OUT] [decode] [real]   # default: decode
#
# decode: bench/decode.py at the Llama-3.2-1B and Llama-3.1-8B shapes in bf16, batch 1 and 16 (one
#   memory and 4 mixed), koff against transformers' generate, with weights read per second against
#   the device's bandwidth. Random weights: nothing to carry but the checkout. llama.cpp is left out
#   there (its Python binding is built for the CPU).
# real: the README's first command over seeds 0-2 at 12% and at 25% sparsity, at a GPU budget
#   (STEPS x BATCH, default the GPU sweep's 250 x 40 with size:0.5 sampling; the config's LoRA 3e-3), six runs
#   side by side on the one GPU, each resumed where a cut-off call left it. It needs the embedded
#   model and corpora/: carry scripts/offline_kit.sh's two halves and run scripts/offline_unpack.sh
#   first (PYTHONPATH as it says). Long: start it with scripts/detached.sh and `wait` in later calls.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:?give OUT or set \$OUT}}
shift || true
stages=("${@:-decode}")
mkdir -p "$out"
for stage in "${stages[@]}"; do
    case "$stage" in
    decode)
        python bench/decode.py --shapes llama-3.2-1b llama-3.1-8b --device cuda --dtype bfloat16 --no-llama-cpp \
            --out "$out" --name decode-gpu
        ;;
    real)
        budget=(--flag=--device=cuda --flag=--steps="${STEPS:-250}" --flag=--batch-size="${BATCH:-40}"
                --flag=--sampling=size:0.5 --seeds 0 1 2 --jobs 3 --results "$out")
        python bench/first_command.py "${budget[@]}" --run runs/gpu-real-s12 --name first-command-gpu-s12 &
        python bench/first_command.py "${budget[@]}" --flag=--sparsity=0.25 --run runs/gpu-real-s25 --name first-command-gpu-s25 &
        wait -n && wait -n
        ;;
    *)
        echo "gpu_owed.sh: unknown stage '$stage': decode or real" >&2
        exit 2
        ;;
    esac
done
