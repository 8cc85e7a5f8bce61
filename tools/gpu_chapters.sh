#!/usr/bin/env bash
# Run the chapters' GPU cells on a CUDA machine that has no package index (the lent H200s):
#   bash tools/gpu_chapters.sh [extra nbdev_test args, e.g. --skip_file_re '^0[5-8]']
# Needs the wheels of nbdev, execnb, fastcore, ipywidgets and their dependencies in .whl/ (git-ignored; see
# chapter 17 for the `pip download` line that fetches them on a machine with an index). Installs them into
# /tmp/site without touching the machine's own packages, puts the checkout on PYTHONPATH (there `pip install -e .`
# fails: build isolation wants an index), and runs every chapter with `#| cuda` cells on.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
# one notebook at a time: each engine sizes its KV cache from the GPU memory that is free
python3 /tmp/site/bin/nbdev_test --flags cuda --n_workers 1 --timing "$@"
