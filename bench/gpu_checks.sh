#!/usr/bin/env bash
# Every GPU check the engine still owes, in one run that fits one device lease (about 8 minutes of
# an H200's time; each step has its own time limit, so a slow step costs its own figures only).
#
#   device tool: run, command "bash bench/gpu_checks.sh", timeout_s 570
#
# Writes everything it prints to $OUT/gpu_checks.log. What it checks, in order of what a GPU
# session most needs to know:
#   1. the built-in model's speed, eager and CUDA-graph steps, against full recomputation and an
#      autoregressive model of its shape, batch 1 and 32 (the engine issue's speed targets), with
#      the host time each graph row spent outside replays (eager first steps and captures);
#      Every bench/engine.py row on CUDA is also measured against transformers' static KV cache,
#      compiled with CUDA graphs (--ar-static is the default there), the ratio against the faster;
#   2. the same tokens on the GPU as on the CPU, batched as alone, cached as recomputed, graph
#      as eager: built-in model (reference), LLaDA2's editing (a captured step holds its state),
#      Fast-dLLM v2 (shifted logits in the captured step), SDAR;
#   3. a full-size DiffusionGemma-26B-A4B of random bf16 weights built on the GPU: peak memory,
#      decoder rows/s and tokens/s at batch 1, 8, 32, 64, at most 12 denoising steps per 256-token
#      canvas, against transformers' generate() (vLLM's recipe caps this model at 4 sequences).
# The device image has torch and transformers; a Python package it lacks is carried as a wheel in
# .gpu_wheels/ (ignored by git; fill it here with `pip download --no-deps -d .gpu_wheels NAME`
# and name .gpu_wheels in the run's carry).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
log=$OUT/gpu_checks.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-deps --no-index .gpu_wheels/*.whl 2>&1 | tail -3 | tee -a "$log"
fi

step() {  # step SECONDS COMMAND...: run it with a time limit, log it and its exit code
    local limit=$1
    shift
    echo "### $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step 20 python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
    transformers.__version__, torch.cuda.get_device_name())'
# Batch 1 on 4 prompts (transformers' generate and the recomputation are slow at batch 1), batch 32
# on 32, full recomputation included: the ratios of the engine issue's targets, 256 new tokens each.
step 140 python3 bench/engine.py --device cuda --batches 1 --prompts 4 --new-tokens 256 \
    --samplers "threshold 0.9" --block-lengths 16 --caches exact,graph --recompute-up-to 1
step 140 python3 bench/engine.py --device cuda --batches 32 --prompts 32 --new-tokens 256 \
    --samplers "threshold 0.9" --block-lengths 16 --caches exact,graph --recompute-up-to 32
step 55 python3 bench/device_agreement.py --device cuda
step 55 python3 bench/device_agreement.py --device cuda --random-shape 512x8x8 --family llada2 \
    --sampler "threshold 0.5 edit 0.3"
step 55 python3 bench/device_agreement.py --device cuda --random-shape 512x8x8 --family fast_dllm_v2 \
    --sampler "threshold 0.9"
step 55 python3 bench/device_agreement.py --device cuda --random-shape 512x8x8 --family sdar
step 240 python3 bench/diffusiongemma.py --device cuda --full-size --batches 1,8,32,64 --max-steps 12
