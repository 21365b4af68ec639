#!/usr/bin/env bash
# The README's first command: installs what it needs, then runs hack/demo.py (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python hack/demo.py "$@"
