#!/usr/bin/env bash
# Install torch into the virtualenv: the CPU build unless GPU=1.
#   - a CPU wheel on pip's find-links (e.g. an offline mirror) is used as it is;
#   - otherwise the CPU build comes from PyTorch's CPU index (TORCH_INDEX overrides it);
#   - GPU=1 takes PyPI's default build (CUDA on Linux) or TORCH_INDEX.
set -euo pipefail
pip="$1"; spec="$2"
flags=(--disable-pip-version-check --progress-bar on)
if [ "${GPU:-}" = "1" ]; then
  exec "$pip" install "${flags[@]}" "$spec" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
if [ -z "${TORCH_INDEX:-}" ] &&
   "$pip" download --quiet "${flags[@]}" --no-index --no-deps -d "$probe" "$spec" >/dev/null 2>&1 &&
   ls "$probe" | grep -q '+cpu'; then
  exec "$pip" install "${flags[@]}" "$spec"  # pip prefers the local +cpu build
fi
exec "$pip" install "${flags[@]}" "$spec" \
  --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" --extra-index-url https://pypi.org/simple
