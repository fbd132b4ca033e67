#!/usr/bin/env bash
# Every benchmark on one GPU, in stages that each fit a 10-minute window. Jobs of a stage share the
# GPU through one lock file: compiles overlap, timed sections never do (kernel benches run under
# `flock`, e2e.py / remat_sweep.py take the lock for their timed steps). Results go to $OUT/<stage>/,
# packed into $OUT/<stage>.tgz when $OUT is set (PACK=0 keeps the folder).
#
#   bash bench/run_all.sh kernels      # GPU tests, attention, NF4, loss kernels; kv4-vs-kv16 200-step loss
#   bash bench/run_all.sh e2e8192      # lowmem_lean, lowmem, unsloth, bnb+Liger, eager at 8192
#   bash bench/run_all.sh e2e2048      # the same at 2048, plus inductor and lowmem_base
#   bash bench/run_all.sh loss_e2e     # the fused loss end to end: with / without it, logits dropped, no head at all
#   bash bench/run_all.sh sweep8192    # Inductor's activation_memory_budget points and checkpointing, 32 layers
#   bash bench/run_all.sh sweep8192b   # lowmem's budgets, in one table and plot with sweep8192's points
#                                      # (PREVIOUS=path of sweep8192's remat_sweep.json, unpacked from its archive)
#
# Needs the peers on PYTHONPATH for the e2e stages (bench/README.md, "The GPU machine").
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"stage: kernels | e2e8192 | e2e2048 | loss_e2e | sweep8192 | sweep8192b"}
out=${OUT:-bench/results}/$stage
lock=${GPU_LOCK:-/tmp/lowmem_gpu.lock}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
e2e() { python3 bench/e2e.py --gpu-lock "$lock" --time-limit 540 "$@"; }
case $stage in
  kernels)
    (OUT=$out/kv_bits_loss timeout 400 python3 bench/kv_bits_loss.py --variants kv16,kv4 > "$out/kv_bits_loss.log" 2>&1) &
    flock "$lock" timeout 150 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1
    tail -1 "$out/pytest_gpu.log"
    OUT=$out/attention flock "$lock" timeout 150 python3 bench/attention.py > "$out/attention.log" 2>&1
    OUT=$out/nf4 flock "$lock" timeout 150 python3 bench/kernels_nf4.py > "$out/nf4.log" 2>&1
    flock "$lock" timeout 60 python3 bench/loss.py --out "$out/loss" > "$out/loss.log" 2>&1
    wait
    tail -8 "$out/attention.log"; tail -3 "$out/loss.log"; tail -4 "$out/kv_bits_loss.log" ;;
  e2e8192|e2e2048)
    seq=${stage#e2e}
    extra=$([ "$seq" = 2048 ] && echo ",inductor,lowmem_base" || echo "")
    e2e --seqs "$seq" --configs lowmem_lean,lowmem,unsloth --out "$out/a" > "$out/a.log" 2>&1 &
    e2e --seqs "$seq" --configs "bnb_qlora_gc_liger,eager$extra" --out "$out/b" > "$out/b.log" 2>&1 &
    wait
    grep -h "^| " "$out"/a/e2e.md "$out"/b/e2e.md | grep -v "^| config\|^|---" ;;
  loss_e2e)
    e2e --seqs 8192,2048 --configs lowmem --no-head --out "$out/nohead" > "$out/nohead.log" 2>&1 &
    e2e --seqs 2048 --lowmem 'lowmem_nofl={"fused_loss":"off"}' --lowmem 'lowmem_drop={"logits":"drop"}' \
      --configs lowmem_nofl,lowmem_drop --out "$out/loss" > "$out/loss.log" 2>&1 &
    wait
    grep -h "^| lowmem" "$out"/nohead/e2e.md "$out"/loss/e2e.md ;;
  sweep8192)
    OUT=$out timeout 570 python3 bench/remat_sweep.py --layers 32 --seq 8192 --parallel 2 --gpu-lock "$lock" \
      --time-limit 560 --kinds stock > "$out/sweep.log" 2>&1
    tail -14 "$out/sweep.log" ;;
  sweep8192b)
    OUT=$out timeout 570 python3 bench/remat_sweep.py --layers 32 --seq 8192 --parallel 2 --gpu-lock "$lock" \
      --time-limit 560 --kinds lowmem --fixed full --budgets 20,28,36 \
      --previous "${PREVIOUS:-${OUT:-bench/results}/sweep8192/remat_sweep.json}" > "$out/sweep.log" 2>&1
    tail -14 "$out/sweep.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
# Where $OUT is a folder a remote machine sends back (with a cap on the number of files), pack the
# stage into one archive.
if [ -n "${OUT:-}" ] && [ "${PACK:-1}" != 0 ]; then
  tar -czf "$OUT/$stage.tgz" -C "$out" . && rm -rf "$out" && echo "packed: $OUT/$stage.tgz"
fi
