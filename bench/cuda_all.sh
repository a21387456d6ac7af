#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (a borrowed GPU's time is short):
#   bash bench/cuda_all.sh tests   # the CUDA tests (tests/test_cuda.py and the fp16 run in tests/test_train.py)
#   bash bench/cuda_all.sh bench   # bench/bench.py against diffusers + peft, all cases (fp16 ones included)
#   bash bench/cuda_all.sh toy     # python train.py and sample.py on the GPU, as a user runs them
# Logs and figures go to $OUT (default runs/cuda).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bench toy)
for w in "${parts[@]}"; do
    case $w in
      tests) $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_cuda.py \
               "tests/test_train.py::test_fp16_run_on_cuda" 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
      bench) $PY bench/bench.py --device cuda --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
      toy) rm -rf /tmp/sd-lora-toy-cuda
           { time $PY train.py --device cuda --out /tmp/sd-lora-toy-cuda; } > "$OUT/toy_train.log" 2>&1
           tail -25 "$OUT/toy_train.log"
           $PY sample.py --ckpt toy/tiny_sd.safetensors --device cuda --prompt "a large purple circle in the center" \
               --lora /tmp/sd-lora-toy-cuda/lora_final.safetensors --out "$OUT" --seed 1 2>&1 | tail -3 ;;
      *) echo "unknown part $w: tests, bench or toy"; exit 2 ;;
    esac
done
