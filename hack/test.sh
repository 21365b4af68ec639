#!/usr/bin/env bash
# The test command (README, CI): installs what it needs, checks generated files and lint, runs pytest.
#   hack/test.sh                  # everything that runs without a GPU (GPU tests skip themselves)
#   hack/test.sh tests/test_x.py  # a subset (pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
hack/bootstrap.sh
echo "==> lint and generated files"
.venv/bin/ruff check .
.venv/bin/python -m finetune_api.crd --check
echo "==> pytest"
# SeaweedFS (the tests' S3) stops taking writes when its disk has under 1 % free, and every upload
# after that is an InternalError; say so now rather than as 20 failing trainer tests at the end.
free_gb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print int($4 / 1048576)}')
if (( free_gb < ${FTO_MIN_FREE_GB:-16} )); then
  echo "!! only ${free_gb} GB free under ${TMPDIR:-/tmp}: a full run writes ~13 GB there (models, GGUFs," \
       "S3 data) and SeaweedFS turns read-only near a full disk. Free some space (FTO_MIN_FREE_GB overrides)." >&2
  exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export PATH="$PWD/.venv/bin:$PATH"
# pytest exits 5 when it collected no test: that is a failure too (set -e).
.venv/bin/python -m pytest "${@:-tests}" --durations=15
echo "==> total $((SECONDS - t0))s"
