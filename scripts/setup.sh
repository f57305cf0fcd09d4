#!/usr/bin/env bash
# Set up curvlib in the current Python environment.
#   bash scripts/setup.sh          core library (torch, opt_einsum, numpy)
#   bash scripts/setup.sh test     plus the test dependencies
# A torch that is already installed is reused (never a second download); otherwise torch 2.13.0
# is installed (on the project's CPU machines this is a local wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
constraint=$(mktemp)
echo "torch==${torch_version}" > "$constraint"
target="."
[ -n "$extra" ] && target=".[${extra}]"
python -m pip install -q -c "$constraint" -e "$target"
rm -f "$constraint"
if [ "$extra" = "test" ] && ! python -c "import backpack" 2>/dev/null; then
  # BackPACK (reference for the plug-in's tests) stays optional; --no-deps because it lists
  # torchvision, which would pull a second (CUDA) torch; nothing it needs imports torchvision.
  python -m pip install -q --no-deps "backpack-for-pytorch>=1.6" "einops>=0.3,<1" "unfoldNd>=0.2,<1"
fi
