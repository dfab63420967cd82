# Shared by scripts/*: make .venv (if missing) and install the project into it.
# Usage: VENV_EXTRAS=test . scripts/_venv.sh   (extras optional)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "hdfmgr needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv $VENV" >&2
    "$PY" -m venv "$VENV"
fi
extras=${VENV_EXTRAS:-}
stamp="$VENV/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    echo "installing hdfmgr${extras:+[$extras]} into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${extras:+[$extras]}" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c 'import hdfmgr, watchdog, peewee, docopt, yaml' || { echo "install failed" >&2; exit 1; }
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
