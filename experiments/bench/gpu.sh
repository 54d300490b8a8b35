#!/usr/bin/env bash
# The jaxnets benchmark on a GPU machine: the same workloads as `make bench`, on the GPU.
#
#   bash experiments/bench/gpu.sh                  # full run, writes bench-results-gpu.json
#   bash experiments/bench/gpu.sh --quick          # smoke test (any extra args go to the bench)
#
# Needs a Python with a CUDA-enabled jax plus flax, optax, chex (and torch with CUDA for the
# PyTorch column). Where jax has no GPU backend yet, install the CUDA build first, e.g.
#   pip install -U "jax[cuda12]"
# (or set JAXNETS_INSTALL_CUDA=1 to let this script try exactly that).
# On the GPU: jaxnets' recurrent layers keep their fused custom VJP, convolutions use
# XLA/cuDNN (jaxnets.ops.conv impl="auto"), PyTorch runs on CUDA (channels-last for the
# CNNs), and jax.experimental.rnn (cuDNN's fused LSTM) is an extra LSTM reference column.
# The memory rows report XLA's temporary buffer size (device memory); RSS is host memory.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

backend() { "$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none; }
if [[ "$(backend)" != "gpu" ]]; then
    if [[ "${JAXNETS_INSTALL_CUDA:-0}" == "1" ]]; then
        "$PY" -m pip install -q -U "jax[cuda12]"
    fi
    if [[ "$(backend)" != "gpu" ]]; then
        echo "gpu.sh: jax sees no GPU (backend: $(backend)); install jax[cuda12] first" >&2
        exit 1
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || echo "torch: not installed (the torch column will say so)"
exec "$PY" -m experiments.bench --out bench-results-gpu.json "$@"
