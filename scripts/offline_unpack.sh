#!/usr/bin/env bash
# Unpack what scripts/offline_kit.sh packed, on the machine without network: rejoin and check the
# model's wheel, install the carried wheels into SITE (not into the machine's own environment)
# and restore corpora/. Then, in the same shell:  export PYTHONPATH=SITE:$PWD
#
#   bash scripts/offline_unpack.sh [SITE]       # from the checkout's root; SITE: /tmp/koff-site
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${1:-/tmp/koff-site}
KIT=.kit
PY=${PYTHON:-python3}
fail() { echo "offline_unpack.sh: $*" >&2; exit 1; }
for part in a b; do
    [ -f "$KIT/$part/model.sha256" ] || fail "$KIT/$part is missing: send both halves of the kit"
done
name=$(cut -d' ' -f3 "$KIT/a/model.sha256")
rm -rf "$KIT/whl" && mkdir -p "$KIT/whl"
cat "$KIT/a/$name.part0" "$KIT/b/$name.part1" > "$KIT/whl/$name"
(cd "$KIT/whl" && sha256sum --status -c "../a/model.sha256") || fail "$name does not match its checksum: pack the kit again"
cp "$KIT"/a/*.whl "$KIT/whl/"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/whl/*.whl
[ -d corpora ] || tar -xJf "$KIT/b/corpora.tar.xz"
echo "unpacked: $(ls "$KIT/whl" | tr '\n' ' ')into $SITE; corpora/ has $(ls corpora | wc -l) sources"
echo "now: export PYTHONPATH=$SITE:$PWD"
