#!/usr/bin/env bash
# Download the cp312 wheels that cifarflow needs on a lent GPU machine (Python 3.12, JAX with CUDA,
# PyTorch, NumPy, pandas, scikit-learn, h5py, Pillow, ONNX Runtime, click, PyYAML, rich, ...; no
# TensorFlow, Keras, MLflow, Optuna, SQLAlchemy, alembic or pydantic) into .whl/ (git-ignored), and
# print each wheel's size and the total. The list is what `cifarflow train` imports on JAX (found by
# dumping sys.modules of a JAX run with TensorFlow blocked) minus the device's own packages
# (/work/.library/device/KINDS.md), plus optuna for `cifarflow tune`. Versions are this venv's
# (pyproject.toml pins the direct ones). Usage: bash bench/gpu/fetch_wheels.sh [DEST (default .whl)]
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
wheels=(
  # Keras 3 and its two deps the device lacks (absl-py, h5py, ml-dtypes, numpy, rich are there)
  keras==3.15.1 namex==0.1.0 optree==0.20.0
  # MLflow: skinny + tracing hold the client and the SQLite (SQLAlchemy) store; the full `mlflow`
  # wheel adds only the UI/server (~40 MB), not needed to log runs
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2
  sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12  # the SQL store's model-registry tables import cryptography
  cachetools==7.3.3 databricks-sdk==0.167.0 google-auth==2.63.1 pyasn1==0.6.5 pyasn1-modules==0.4.2
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0 python-dotenv==1.2.4
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 sniffio==1.3.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  # config validation
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  # tuning (cifarflow tune; not used by run.sh's steps, cheap to carry)
  optuna==5.0.0 optuna-integration==5.0.0 colorlog==6.12.0
)
mkdir -p "$dest"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}" 2>&1 \
  | { grep -v "^WARNING: Location 'file:" || true; }
ls -l "$dest"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5/1048576, $NF; t += $5} END {printf "%8.2f MiB  total (%d wheels)\n", t/1048576, NR}'
