# Shared by scripts/serve and scripts/check: make .venv and install llmgateway into it when needed.
# usage: ensure_venv "<pip extras spec>"
ensure_venv() {
  local spec="$1" stamp=".venv/.installed-$2"
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "llmgateway needs Python 3.11 or newer (python3 is $(python3 --version 2>&1))" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    echo "Installing llmgateway and its dependencies into .venv (first run only; log: .venv/pip.log)..." >&2
    if ! .venv/bin/python -m pip install --quiet -e "$spec" >.venv/pip.log 2>&1; then
      cat .venv/pip.log >&2
      echo "pip install failed (see above)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}
