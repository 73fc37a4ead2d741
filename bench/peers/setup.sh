#!/usr/bin/env bash
# Create one virtual environment per peer toolkit, each with the same torch build as zsq's
# main venv, the peer package at the exact version benchmarked, and zsq itself (editable), so
# the peer scripts load zsq's model zoo, data loaders and top-1 code.
#
#   bash bench/peers/setup.sh            # both peers
#   bash bench/peers/setup.sh mct        # only one (mct | aimet)
#
# Idempotent: a venv whose marker file records the same pins is left alone; a half-built one is
# repaired by re-running pip (pip skips what is already installed). Override the interpreter with
# PYTHON=/path/to/python3.11.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
declare -A PEER_PKG=(
  [mct]="model-compression-toolkit==2.6.1"
  [aimet]="aimet-torch==2.30.0"
)
declare -A PEER_IMPORT=(
  [mct]="model_compression_toolkit"
  [aimet]="aimet_torch"
)

peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then peers=(mct aimet); fi

# pip runs compile bytecode and unpack wheels: keep it off the cores other jobs use as far as possible.
export OMP_NUM_THREADS=1

for peer in "${peers[@]}"; do
  pkg="${PEER_PKG[$peer]:-}"
  if [ -z "$pkg" ]; then
    echo "setup.sh: unknown peer '$peer' (choose from: ${!PEER_PKG[*]})" >&2
    exit 2
  fi
  venv="$HERE/.venv-$peer"
  marker="$venv/.zsq-peer-ok"
  want="$pkg ${TORCH_PINS[*]} zsq-editable:$ROOT"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] \
     && "$venv/bin/python" -c "import ${PEER_IMPORT[$peer]}, zsq" >/dev/null 2>&1; then
    echo "[$peer] $venv is ready ($pkg), skipping"
    continue
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "[$peer] creating $venv"
    "$PYTHON" -m venv "$venv"
  fi
  echo "[$peer] installing ${TORCH_PINS[*]} $pkg and zsq (editable) into $venv"
  # One resolve for everything, so the peer's own requirements cannot move torch off the pin.
  # (the grep drops pip's notes about this machine's absent local index folders; pip's status is kept)
  nice -n 10 "$venv/bin/python" -m pip install --quiet \
    "${TORCH_PINS[@]}" "$pkg" -e "$ROOT" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$venv/bin/python" - <<PY
import importlib.metadata as md, torch, zsq
print("[$peer] ok: torch", torch.__version__, "| ${pkg%%==*}", md.version("${pkg%%==*}"))
PY
  echo "$want" > "$marker"
done
