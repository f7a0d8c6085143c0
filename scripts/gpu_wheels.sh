#!/usr/bin/env bash
# Run HERE (the development machine, which reaches PyPI) before a GPU device run: puts into .whl/ (git-ignored;
# name it in the device tool's `carry`) the wheels of hwprune's dependencies that the GPU image lacks. The image
# already has torch, torchvision, numpy, pandas, onnx, onnxruntime (CPU), nvidia-ml-py, pyyaml, tqdm, tabulate,
# portalocker, markupsafe, typing-extensions (see /work/.library/device/KINDS.md). About 6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 SQLAlchemy==2.1.9 Mako==1.4.3 torch-pruning==1.6.1 \
  yacs==0.1.8 termcolor==3.3.0
# fvcore and iopath publish source only: build their (pure-Python) wheels here
$PY -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10
ls .whl
