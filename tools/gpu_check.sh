#!/usr/bin/env bash
# The GPU checklist (../shared/gpu-checklist.md) in one run: correctness runs on the embedded model in float64
# (their .pt/.json come back in $OUT/results.tgz, compared with the CPU here by tools/gpu_compare.py), then
# the fast paths (TF32, bf16, finite differences: benchmarks/fast_paths.py, timed and audited), then
# benchmarks/gpu.py. Every step has its own time limit; the log is $OUT/log.txt.
#   OUT=/tmp/gpu bash tools/gpu_check.sh [speed budget seconds]
set -u
set -f # --params * stays a word
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check}
R=$OUT/res
mkdir -p "$R"
LOG=$OUT/log.txt
BUDGET=${1:-270}
PY=${PYTHON:-python3}
DEV=${DEV:-cuda}
DEVS=${DEVS:-cuda:0,cuda:0}
E="--dtype float64 --no_progress --b 4 --output_dir $R --threads 2"
t0=$(date +%s)

step() { # step NAME LIMIT CMD...: run, log its output and status
  local name=$1 limit=$2
  shift 2
  local s=$(date +%s)
  timeout "$((limit * ${SLOW:-1}))" "$@" >"$R/$name.log" 2>&1
  local rc=$?
  echo "[$(($(date +%s) - t0))s] $name rc=$rc ($(($(date +%s) - s))s): $*" | tee -a "$LOG"
  tail -n 4 "$R/$name.log" | sed 's/^/    /' | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

# 1. correctness, several at once on the one GPU (each with 2 CPU threads)
step s1 150 $PY single_layer_single_block.py $E --device $DEV --name s1 &
step s2 150 $PY single_layer_several_blocks.py $E --t 16 --device $DEV --name s2 &
step s3 150 $PY several_layers_several_blocks.py $E --t 8 --device $DEV --name s3 &
step d 150 $PY hessian_diagonal.py $E --device $DEV --name d &
step sp 150 $PY hessian_spectrum.py $E --device $DEV --name sp &
step w2 150 $PY single_layer_single_block.py $E --devices $DEVS --model_input_bs 1 --name w2 &
step dm 150 $PY single_layer_single_block.py $E --device_map auto --name dm &
step fdbf 150 $PY single_layer_single_block.py $E --device $DEV --hvp finite_difference --attn_implementation sdpa --dtype bfloat16 --name fdbf &
wait

# killed and resumed vs uninterrupted (a checkpoint after every unit)
CK="$E --b 8 --model_input_bs 1 --device $DEV"
step un 150 $PY single_layer_single_block.py $CK --name un &
(
  $PY single_layer_single_block.py $CK --checkpoint_every 1 --name ck >"$R/ck_killed.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -f "$R/ck.ckpt" ] && break; sleep 0.1; done
  sleep 1
  kill -9 $pid
  echo "killed the checkpointed run: $(ls "$R" | grep '^ck' | tr '\n' ' ')" | tee -a "$LOG"
  step ck 150 $PY single_layer_single_block.py $CK --checkpoint_every 1 --resume --name ck
) &
wait

# finite differences: one process vs torchrun + FSDP on NCCL (1 rank; 2 ranks on a 1-GPU machine must be refused in one line)
F="--dataset embedded --params * --b 3 --seqlen 12 --dtype float64 --top_k 3 --max_iter 12 --tol 1e-12 --no_progress --output_dir $R --hvp finite_difference"
step fd1 150 $PY hessian_spectrum.py $F --device $DEV --name fd1 &
step fsdp2 120 $PY -m torch.distributed.run --standalone --nproc_per_node 2 hessian_spectrum.py $F --fsdp --device $DEV --name fsdp2 &
wait
step fsdp1 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 hessian_spectrum.py $F --fsdp --device $DEV --name fsdp1
# the fast paths (issue 28): TF32 and bf16 runs audited in the run (the audit line and the JSON's audit section)
step tf32 150 $PY single_layer_single_block.py --no_progress --b 4 --output_dir $R --threads 2 --device $DEV --matmul_precision high --name tf32 &
step bf16 150 $PY single_layer_single_block.py --no_progress --b 4 --output_dir $R --threads 2 --device $DEV --dtype bfloat16 --name bf16 &
wait
grep -h "^audit:" "$R/tf32.log" "$R/bf16.log" | sed 's/^/    /' | tee -a "$LOG"
echo "[$(($(date +%s) - t0))s] correctness done" | tee -a "$LOG"
(cd "$R" && tar czf "$OUT/results.tgz" --exclude='*.png' --exclude='*.pdf' .)

# 2. speed, alone on the GPU: first Fig. 1a's columns by each fast path, timed and audited against float64 (the rows
# of the README's GPU paragraph and docs/long_runs.md's fast-path table), then benchmarks/gpu.py
[ "$BUDGET" -gt 0 ] || exit 0
step fast 240 $PY benchmarks/fast_paths.py --device $DEV --columns 32 --audit 8
cp "$R/fast.log" "$OUT/fast_paths.txt"
timeout $((BUDGET + 90)) $PY benchmarks/gpu.py --device $DEV --budget_s "$BUDGET" 2>&1 | tee "$OUT/speed.txt"
echo "[$(($(date +%s) - t0))s] all done" | tee -a "$LOG"
