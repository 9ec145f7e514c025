#!/usr/bin/env bash
# Lint (a few seconds): ruff with the bug-finding rules of pyproject.toml [tool.ruff.lint], no style rules.
# .ci/run calls it before the tests. Extra arguments pass through: bash scripts/lint.sh --fix
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec ruff check alignkit tests scripts setup.py "$@"
