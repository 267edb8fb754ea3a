#!/usr/bin/env bash
# One-command set-up for efficientps_d2 on a fresh machine.
#
#   bash scripts/setup_env.sh            # creates .venv and installs everything
#   VENV=/path/to/venv bash scripts/setup_env.sh
#   EPS_DETECTRON2=git bash scripts/setup_env.sh   # official detectron2 from git (needs network + compiler)
#   EPS_ONNX=0 bash scripts/setup_env.sh           # skip the optional onnx + onnxruntime
#
# Idempotent: re-running only installs what is missing. Every step says what it does and the script
# stops at the first failing step with the step's name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EPS_DETECTRON2="${EPS_DETECTRON2:-wheel}"
EPS_ONNX="${EPS_ONNX:-1}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
# A pure-Python snapshot of upstream detectron2 (commit a59f056); see README "Set-up".
D2_WHEEL="sal-detectron2==0.7.2"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nERROR (step: %s): %s\n' "$CURRENT_STEP" "$*" >&2; exit 1; }
CURRENT_STEP="start"
trap 'fail "command failed on line $LINENO"' ERR

CURRENT_STEP="virtual environment"
if [ ! -x "$VENV/bin/python" ]; then
  step "Creating virtual environment at $VENV"
  "$PYTHON" -m venv "$VENV"
else
  step "Using existing virtual environment at $VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

CURRENT_STEP="torch"
step "Installing $TORCH_SPEC"
# shellcheck disable=SC2086
"${PIP[@]}" -q $TORCH_SPEC

CURRENT_STEP="runtime dependencies"
step "Installing detectron2's and efficientps_d2's runtime dependencies"
"${PIP[@]}" -q "numpy" "Pillow" "opencv-python-headless" "fvcore" "iopath" "pycocotools" \
  "omegaconf>=2.1,<2.4" "hydra-core>=1.1" "cloudpickle" "matplotlib" "tensorboard" "tabulate" \
  "termcolor" "yacs" "tqdm" "packaging" "setuptools<81" "cityscapesscripts==2.3.0"

CURRENT_STEP="panopticapi"
step "Installing panopticapi (panopticapi-lite, without its needless numpy<2 pin)"
echo "    (pip's later 'dependency conflicts' note about panopticapi-lite's numpy<2 and scikit-image"
echo "    requirements is expected: panopticapi's code runs on numpy 2 and never imports scikit-image)"
"${PIP[@]}" -q --no-deps "panopticapi-lite==0.2.0"

CURRENT_STEP="detectron2"
if "$PY" -c "import detectron2, detectron2.modeling" 2>/dev/null; then
  step "detectron2 already importable: $("$PY" -c 'import detectron2; print(detectron2.__file__)')"
elif [ "$EPS_DETECTRON2" = "git" ]; then
  step "Installing detectron2 from its official git repository (builds C++/CUDA ops)"
  "${PIP[@]}" --no-build-isolation "git+https://github.com/facebookresearch/detectron2.git"
elif [ "$EPS_DETECTRON2" = "wheel" ]; then
  step "Installing pure-Python detectron2 from $D2_WHEEL"
  D2_HOME="$VENV/detectron2-src"
  TMP="$(mktemp -d)"
  # The wheel is tagged cp310 only; its Python sources run on newer Pythons, its _C extension does not.
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.10 --implementation cp -d "$TMP" "$D2_WHEEL"
  "$PY" -m zipfile -e "$TMP"/*.whl "$TMP/unpacked"
  rm -rf "$D2_HOME" && mkdir -p "$D2_HOME"
  mv "$TMP/unpacked/detectron2" "$D2_HOME/detectron2"
  # The compiled ops are built for CPython 3.10 and cannot load here; ROIAlign/NMS come from torchvision.
  find "$D2_HOME/detectron2" -name '_C*.so' -delete
  rm -rf "$TMP"
  echo "$D2_HOME" > "$SITE/detectron2-pure-python.pth"
  "$PY" -c "import detectron2.modeling" || fail "detectron2 was unpacked to $D2_HOME but does not import"
else
  fail "EPS_DETECTRON2 must be 'wheel' or 'git', got '$EPS_DETECTRON2'"
fi

CURRENT_STEP="onnx (optional)"
if [ "$EPS_ONNX" = "1" ]; then
  # Optional: ONNX export (torch.onnx.export needs onnx) and running it on the CPU (onnxruntime).
  # Versions verified with torch 2.14 and numpy 2 on Python 3.11.
  step "Installing onnx and onnxruntime (optional; EPS_ONNX=0 skips them)"
  "${PIP[@]}" -q "onnx==1.23.2" "onnxruntime==1.32.0"
else
  step "Skipping onnx and onnxruntime (EPS_ONNX=$EPS_ONNX): no ONNX export, its tests skip"
fi

CURRENT_STEP="efficientps_d2"
step "Installing efficientps_d2 (editable) and the test/lint tools"
"${PIP[@]}" -q --no-deps -e "$ROOT"
# Pinned: a new black or flake8 release can reformat or flag unchanged code and fail CI.
"${PIP[@]}" -q "pytest==9.2.0" "black==26.10.1" "isort==9.0.2" "flake8==7.5.0"

CURRENT_STEP="check"
step "Checking the installation"
"$PY" -c "import efficientps_d2, detectron2, torch; print('efficientps_d2 OK | detectron2', detectron2.__version__, '| torch', torch.__version__)"
printf '\nDone. Activate with: source %s/bin/activate\n' "$VENV"
