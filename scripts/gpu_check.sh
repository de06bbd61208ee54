#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine (see README "On a GPU"): every figure it prints is
# measured there. Usage: scripts/gpu_check.sh CORPUS OUTDIR   (charrnn importable, e.g. PYTHONPATH=.)
corpus=${1:?corpus}; out=${2:?outdir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo; echo "=== $1"; shift; "$@" 2>&1; echo "--- exit $?"; }
step "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $py -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())'"
step "bench: raw loop vs charrnn, CPU shapes, on cuda" timeout 150 $py -m charrnn bench --sections train --device cuda --steps 60 --rounds 2 --json
step "bench: GPU shape" timeout 100 $py -m charrnn bench --sections train --device cuda --shapes lstm2x1024,gru2x1024 --batch-size 128 --seq-len 128 --steps 60 --rounds 2 --json
step "train with the defaults, 90 s" timeout 150 $py -m charrnn train "$corpus" --device cuda --time 90s --run-dir "$out/default"
step "sample it on the CPU (no GPU visible)" env CUDA_VISIBLE_DEVICES= timeout 60 $py -m charrnn sample "$out/default" --temp 0.8 --seed 1 --length 400
step "eval on cuda" timeout 60 $py -m charrnn eval "$out/default" "$corpus" --device cuda
step "interrupt (SIGINT) and resume on cuda" bash -c "timeout -s INT 15 $py -m charrnn train '$corpus' --device cuda --steps 1500 --hidden 256 --run-dir '$out/resume' -q; echo interrupted-exit \$?; timeout 120 $py -m charrnn train --resume '$out/resume' --device cuda -q; echo resumed-exit \$?; tail -n 2 '$out/resume/metrics.jsonl'"
for c in mlstm peephole coupled gru; do
  step "cell $c on cuda" timeout 60 $py -m charrnn train "$corpus" --device cuda --cell $c --hidden 512 --steps 150 --eval-every 150 --run-dir "$out/cell-$c" -q
  tail -n 1 "$out/cell-$c/metrics.jsonl"
done
step "train 2x1024, 90 s" timeout 150 $py -m charrnn train "$corpus" --device cuda --time 90s --hidden 1024 --run-dir "$out/wide"
rm -f "$out"/*/*.safetensors "$out"/*/*/*.safetensors
