#!/usr/bin/env bash
# Build dist/memory-backfill: one executable stdlib zipapp (PEP 441) holding
# memory_backfill.py and its runtime dependencies at the exact versions (and
# hashes) pinned in requirements.txt.  Reproducible: fixed timestamps and
# permissions, sorted entries, no __pycache__, no build paths inside.
#
#   ./build_zipapp.sh [OUTPUT]      (default: dist/memory-backfill)
#   PYTHON=python3.11 ./build_zipapp.sh
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/dist/memory-backfill}"
python="${PYTHON:-python3}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir \
    --no-compile --no-deps --only-binary=:all: --require-hashes \
    --target "$stage/app" -r "$here/requirements.txt"
cp "$here/memory_backfill.py" "$stage/app/memory_backfill.py"
# The help text, rendered now by the module itself: `--help` then needs
# neither compiling memory_backfill.py (zipimport compiles from source on
# every run) nor importing argparse.
COLUMNS=80 "$python" -I "$here/memory_backfill.py" --help > "$stage/app/help.txt"
# The entry point, also the module's own (zipapp_main): the Python floor is
# checked before anything is imported.
"$python" -I -B -c 'import sys; sys.path[:0] = [sys.argv[1]]; import memory_backfill as m; sys.stdout.write(m.zipapp_main())' \
    "$here" > "$stage/app/__main__.py"
rm -rf "$stage/app/bin"
find "$stage/app" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$(dirname "$out")"
"$python" - "$stage/app" "$out.tmp" <<'PY'
import os
import sys
import zipfile

source, target = sys.argv[1], sys.argv[2]
paths = []
for folder, dirs, files in os.walk(source):
    dirs.sort()
    paths += [os.path.join(folder, name) for name in files]
with open(target, "wb") as fh:
    fh.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(paths, key=lambda p: os.path.relpath(p, source)):
            info = zipfile.ZipInfo(os.path.relpath(path, source), (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(path, "rb") as src:
                archive.writestr(info, src.read(), compresslevel=9)
PY
chmod 755 "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out ($(wc -c < "$out") bytes)"
