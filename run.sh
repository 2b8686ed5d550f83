#!/usr/bin/env bash
# Runs the main job, from a fresh machine (Debian 12, Python 3.11, pip, root):
#
#   bash run.sh
#
# Installs xrapture (non-editable) into a virtualenv ($XRAPTURE_VENV, default
# .venv-run; reused on rerun), then fine-tunes with configs/finetune.py, writing
# to $WORKDIR (default ./workdir). Extra arguments go to the launcher.
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${REPO}"
source "${REPO}/tools/install.sh"

install_xrapture "${XRAPTURE_VENV:-${REPO}/.venv-run}" ".[experiments]"

step "experiments/finetune.py --config=configs/finetune.py"
exec "${VENV}/bin/python" experiments/finetune.py \
  --config=configs/finetune.py --workdir="${WORKDIR:-./workdir}" "$@"
