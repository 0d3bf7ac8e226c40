#!/usr/bin/env bash
# The GPU run of issue 21, in one command (under 8 minutes on one H100/H200), printing one table:
#   1. `llmtrain bench` for gpt2_124m (bf16, compile, 12 x 1024), trainer.chunked_loss true and
#      false, against a plain PyTorch loop of the same model and batch in the same process
#      (bench.baseline: compiled, fused AdamW), with tokens/s, MFU and peak memory;
#   2. Tiny Shakespeare (+experiment=gpt_shakespeare, compile) time to val loss <= 1.47, AdamW
#      and Muon (process start to the validation line that reaches it);
#   3. generation tokens/s against transformers (scripts/bench_generate.py, when it exists);
#   4. peak memory of each part.
#
#   scripts/gpu_check.sh               # on the GPU machine, from the repository root
#   scripts/gpu_check.sh --cpu-smoke   # every part at tiny sizes on the CPU (tests/test_gpu_check.py)
#
# The GPU image has torch (CUDA), transformers, sentencepiece, safetensors, ... but no hydra-core,
# omegaconf or datasets. Stage their wheels on the development machine first, from the repository
# root, with  ../shared/tools/device-wheels  (it copies them into the git-ignored .whl/ folder,
# which travels with the tree); this script then installs them, offline, into /tmp/site:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# and puts /tmp/site and the repository on PYTHONPATH, so the CLI runs as `python3 -m llmtrain`.
# Outputs (bench.json, run directories, gpu_check.json) go to $OUT if set, else a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: hydra-core/omegaconf missing and no .whl/ folder: run ../shared/tools/device-wheels first" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" scripts/gpu_check.py "$@"
