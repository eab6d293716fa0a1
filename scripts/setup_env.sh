# Sourced by the other scripts: create .venv once and install the project (editable) with
# its test tools; re-install only when pyproject.toml changed. Leaves the venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EQUIFLEX_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    python3 -m venv "$venv"
fi
stamp="$venv/.nnunet_equiflex_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing nnunet-equiflex and its dependencies (nnunetv2, torch, ...) into $venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -e "$root[test]"
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
