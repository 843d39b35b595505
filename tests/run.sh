#!/usr/bin/env bash
# Installs what is missing (virtualenv at .venv, Python packages, Chromium for the browser tests), then runs
# the whole test suite. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

if [ -z "${BINDING_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then set -- -m "slow or not slow"; fi  # both tiers unless told otherwise
exec .venv/bin/python -m pytest --durations=25 "$@"  # the slowest 25 printed: CI must stay under 25 minutes
