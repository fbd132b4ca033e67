#!/usr/bin/env bash
# Every benchmark on one GPU, in stages sized for a 10-minute window. Stages named together run at
# once: they share the GPU through one lock file, so compiles overlap but timed sections never do
# (kernel benches run under `flock`, e2e.py / remat_sweep.py take the lock for their timed steps).
# Results go to $OUT/<stage>/, packed into $OUT/<stage>.tgz when $OUT is set (PACK=0 keeps folders).
#
#   bash bench/run_all.sh kernels                   # GPU tests, attention and NF4 kernels (~4 min)
#   bash bench/run_all.sh kernels_loss              # the loss kernel, kv4-vs-kv16 200-step loss
#   bash bench/run_all.sh trajectory                # offload GPU tests; 4 layers at 8192, 7 steps against fp32 (same
#                                                   # NF4 weights): bf16 eager, stock Inductor, the defaults, `full`,
#                                                   # kv16 with and without `full`, lean under a budget (full+parked)
#   bash bench/run_all.sh families                  # issue 20: Llama-3-8B, Mistral-7B (window 4096), Qwen2.5-7B, Gemma-7B,
#                                                   # Gemma-2-9B shapes, 4 layers at 8192, one family at a time: fp32
#                                                   # reference, eager bf16, lowmem; 1 + 3 steps each (alone, ~6-8 min)
#   bash bench/run_all.sh trajectory_bnb            # bitsandbytes-loaded weights, 2048, 20 steps against fp32: bnb QLoRA,
#                                                   # lowmem lowering them, lowmem with nf4="off" (E2E_LAYERS=8: 8 layers)
#   bash bench/run_all.sh e2e8192                   # 8192: lean options under a budget (full+parked; MLP in 4 pieces
#                                                   # at 6.3 GiB, in 2 at 6.8 GiB, kv4 at 6.3 GiB), Unsloth
#   bash bench/run_all.sh e2e8192c8                 # the headline row beside the same with the MLP in 8 pieces
#   bash bench/run_all.sh layers_all                # per-layer compile, cold: lean under a budget beside Unsloth at
#                                                   # 8192; lean at 32 and 8 layers; lean at 131072; 70B from meta
#   bash bench/run_all.sh first8192                 # time to first step alone: lean under a budget, then Unsloth, at
#                                                   # 8192, with where each first step's time went
#   bash bench/run_all.sh frames8192                # the first step with a frame per decoder layer beside the whole
#                                                   # model's capture and Unsloth, cold, at 8192 (+ framed GPU tests)
#   bash bench/run_all.sh depth8frames              # framed, cold: 8 against 32 layers
#   bash bench/run_all.sh knob                      # memory_budget alone at 8192 ("7GiB") beside the lean row; 2048 ("6GiB")
#   bash bench/run_all.sh capped                    # 10 GiB cap before loading: prepare_ from the CPU + the knob at "10GiB",
#                                                   # then Unsloth under the same cap, 8192 tokens
#   bash bench/run_all.sh depth8                    # the same lean row at 8 layers (first step against depth)
#   bash bench/run_all.sh link                      # pinned device<->host copy rates (the parked plan's link model)
#   bash bench/run_all.sh cudnn_all                 # cuDNN's attention at head dim 128 too, beside our kernels: 8192, then 131072
#   bash bench/run_all.sh long128k                  # 131072 under a 28 GiB budget (parked), then the same with cuDNN attention
#   bash bench/run_all.sh firststep                 # cold first step: framed, kernels warmed in processes / on a thread; Unsloth
#   bash bench/run_all.sh long128kframes            # 131072, 32 layers, a frame per layer (cold first step, peak, speed)
#   bash bench/run_all.sh big70b                    # Llama-3-70B shape from meta, lean, 8192 and 32768 tokens
#   bash bench/run_all.sh recompile8192             # after e2e8192 on the same machine: its lean budget row compiled again
#                                                   # (from AOTAutograd's and Inductor's caches: first step against e2e8192's)
#   bash bench/run_all.sh lean128k                  # lean at 131072 tokens (alone: ~7 min to compile beside others)
#   bash bench/run_all.sh pieces32k                 # 32768: lean with "auto"'s 8 MLP pieces and with 16
#   bash bench/run_all.sh attn32k                   # 32768: lean with and without the attention pass
#   bash bench/run_all.sh nohead drop2048 sweep2048b
#                                                   # no LM head at 8192/2048; 2048: defaults and logits
#                                                   # dropped; lowmem's budgets at 2048 (BUDGETS_2048=)
#   bash bench/run_all.sh sweep8192b                # lowmem's budgets beside sweep8192's points (PREVIOUS= their
#                                                   # remat_sweep.json, default the committed 2026-11-29 one;
#                                                   # BUDGETS= GiB list, FIXED= policies)
#   bash bench/run_all.sh sweep8192 e2e2048         # Inductor's activation_memory_budget points, checkpointing;
#                                                   # 2048: defaults, with CUDA graphs, fused loss off, logits dropped
#   bash bench/run_all.sh nf4e2e2048                # bnb QLoRA (no checkpointing) vs lowmem on its 4-bit weights,
#                                                   # lowered (the op; with CUDA graphs; nf4_matmul="graph") and not
#                                                   # (nf4="off"): 20 steps each (E2E_LAYERS=8: 8 layers)
#   bash bench/run_all.sh nf4e2e2048cg              # its CUDA-graph row again beside bnb QLoRA
#   bash bench/run_all.sh nf4e2e8192                # the same at 8192, 32 layers: bnb beside the op (~5 min)
#   bash bench/run_all.sh nf4e2e8192off             # and nf4="off" there (~4 min)
#
# `kernels` (and `kernels_loss`) run alone: an e2e worker's first step (the compile) runs on the GPU outside the lock, and
# on 2026-11-29 such steps inflated some kernel timings (cuBLAS at M=8192: 613 µs against 346 alone).
# Peak GPU memory of the stages named together must fit the device: each group above stays under
# an H200 (e2e8192 and lean128k together used ~131 GiB, more than any group above). Against the stock points of bench/results/remat/2026-11-29/ (eager
# checkpointing 31.0, Inductor 0.1 / 0.3 / 0.5 / 1.0: 36.5 / 39.2 / 45.7 / 62.4 GiB), `sweep8192b`'s
# 30 GiB point sits under checkpointing and 62 under Inductor 1.0; 40 and 50 fill the curve. Needs the peers on PYTHONPATH for the e2e stages (bench/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "stages: kernels kernels_loss trajectory families trajectory_bnb e2e8192 e2e8192c8 layers_all first8192 frames8192 firststep depth8frames knob capped depth8 link cudnn_all long128k long128kframes big70b recompile8192 lean128k pieces32k attn32k nohead drop2048 sweep2048b sweep8192 sweep8192b e2e2048 nf4e2e2048 nf4e2e2048cg nf4e2e8192 nf4e2e8192off" >&2; exit 2; }
if [ $# -gt 1 ] && [[ " $* " == *" kernels "* || " $* " == *" kernels_loss "* ]]; then
  echo "kernels and kernels_loss run alone (see the header)" >&2; exit 2
fi
lock=${GPU_LOCK:-/tmp/lowmem_gpu.lock}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# E2E_LAYERS=N runs the e2e stages on the first N decoder layers (long sequences where 32 do not fit a window)
e2e() { python3 bench/e2e.py --gpu-lock "$lock" --time-limit "${E2E_TIME_LIMIT:-540}" ${E2E_LAYERS:+--layers "$E2E_LAYERS"} "$@"; }
rows() { grep -h "^| " "$@" | grep -v "^| config\|^|---"; }
lean_budget='lowmem_lean_b6={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"6.3GiB"}'
lean_budget_c2='lowmem_lean_b68c2={"offload":"parked","logits":"drop","mlp_chunks":2,"memory_budget":"6.8GiB"}'
lean_budget_kv4='lowmem_lean_b6kv4={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"6.3GiB","attention":"kv4"}'
lean_budget_c8='lowmem_lean_b6c8={"offload":"parked","logits":"drop","mlp_chunks":8,"memory_budget":"6.3GiB"}'
lean_budget_frames='lowmem_lean_b6_frames={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"6.3GiB"}'
lean_b28='lowmem_lean_b28={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"28GiB"}'
lean_budget_frames_proc='lowmem_lean_b6p_frames={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"6.3GiB","warmup":"processes"}'
lean_b28_frames='lowmem_lean_b28_frames={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"28GiB"}'
lean_c16='lowmem_lean_c16={"remat":"full","offload":"layers","logits":"drop","mlp_chunks":16}'
lean_noattn='lowmem_lean_noattn={"remat":"full","offload":"layers","logits":"drop","mlp_chunks":"auto","attention":"off"}'

stage() {
  local stage=$1 out=${OUT:-bench/results}/$1
  mkdir -p "$out"
  case $stage in
    kernels)
      flock "$lock" timeout 300 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1
      OUT=$out/attention flock "$lock" timeout 150 python3 bench/attention.py > "$out/attention.log" 2>&1
      OUT=$out/nf4 flock "$lock" timeout 200 python3 bench/kernels_nf4.py > "$out/nf4.log" 2>&1
      tail -1 "$out/pytest_gpu.log"; tail -8 "$out/attention.log"; tail -3 "$out/nf4.log" ;;
    kernels_loss)
      flock "$lock" timeout 60 python3 bench/loss.py --out "$out/loss" > "$out/loss.log" 2>&1
      OUT=$out/kv_bits_loss flock "$lock" timeout 200 python3 bench/kv_bits_loss.py --variants kv16,kv4 > "$out/kv_bits_loss.log" 2>&1
      tail -3 "$out/loss.log"; tail -4 "$out/kv_bits_loss.log" ;;
    e2e8192)
      # the lean setup with a budget instead of `full`: the planner may keep, parked in host memory,
      # what is dear to recompute (6.3 GiB: the AdamW state, 0.31 GiB, is outside the cost model,
      # and it predicted 0.96 of the lean peak)
      e2e --seqs 8192 --profile --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out/d" > "$out/d.log" 2>&1 &
      # the same with the MLP in 2 pieces (4 under "auto"): half the dequantizations of the MLP weights
      # (~40 ms a step in 4 pieces) for ~0.46 GiB more at the peak by the cost model, so a 6.8 GiB budget
      e2e --seqs 8192 --profile --lowmem "$lean_budget_c2" --configs lowmem_lean_b68c2 --out "$out/a" > "$out/a.log" 2>&1 &
      # and with 4-bit K/V (the default is kv8 since 2026-11-29: near-exact LoRA gradients for ~0.01 GiB here)
      e2e --seqs 8192 --profile --lowmem "$lean_budget_kv4" --configs lowmem_lean_b6kv4 --out "$out/c" > "$out/c.log" 2>&1 &
      e2e --seqs 8192 --configs unsloth --out "$out/b" > "$out/b.log" 2>&1 &
      wait; rows "$out"/a/e2e.md "$out"/b/e2e.md "$out"/c/e2e.md "$out"/d/e2e.md ;;
    e2e8192c8)
      # the headline row beside the same with the MLP in 8 pieces instead of "auto"'s 4: the cost
      # model predicts a lower peak with 8 at 8192, 32768 and 131072 tokens (examples/plan.py, CPU)
      e2e --seqs 8192 --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out/a" > "$out/a.log" 2>&1 &
      e2e --seqs 8192 --lowmem "$lean_budget_c8" --configs lowmem_lean_b6c8 --out "$out/b" > "$out/b.log" 2>&1 &
      wait; rows "$out"/a/e2e.md "$out"/b/e2e.md ;;
    trajectory)  # 4 layers at 8192, 7 steps: which plans train like an fp32 run of the same weights?
      flock "$lock" timeout 120 python3 -m pytest -q -m gpu tests/test_offload.py -p no:cacheprovider > "$out/pytest_offload.log" 2>&1
      flock "$lock" timeout 420 python3 bench/trajectory.py --layers 4 --seq 8192 --steps 7 --out "$out" \
        --configs eager,inductor,lowmem,lowmem_full,lowmem_kv16,lowmem_full_kv16,lowmem_lean_b3 \
        --lowmem 'lowmem_full={"remat":"full"}' --lowmem 'lowmem_kv16={"attention":"kv16"}' \
        --lowmem 'lowmem_full_kv16={"remat":"full","attention":"kv16"}' \
        --lowmem 'lowmem_lean_b3={"offload":"parked","logits":"drop","mlp_chunks":"auto","memory_budget":"3.2GiB"}' \
        > "$out/trajectory.log" 2>&1
      tail -1 "$out/pytest_offload.log"; tail -12 "$out/trajectory.log" ;;
    families)  # issue 20's end-to-end table: each family in its own process, one at a time (bench/families.py).
      # Estimate per family on an H100: ~10 s to start, fp32 reference (checkpointed) 4 steps x 2-3 s, eager bf16
      # ~5 s, lowmem ~35-60 s to its first step (4 layers; Gemma 2 compiles two layer bodies) + 3 x <0.5 s: ~70-100 s,
      # so 1 warm-up + 3 timed steps (the default) for 5 families in ~6-8 min. A family past 240 s is killed
      # (error rows); none starts after 540 s. Run it alone: other stages' unlocked compiles would slow its steps.
      flock "$lock" timeout 580 python3 bench/families.py --steps 3 --time-limit 240 --total-time-limit 540 \
        --out "$out" > "$out/families.txt" 2>&1
      grep -h "^\[.*\] " "$out/families.txt" | tail -15; sed -n '/^| family | head dim/,/^$/p' "$out/families.md" ;;
    trajectory_bnb)  # bitsandbytes-loaded 4-bit weights, 20 steps at 2048 against fp32: bnb's QLoRA, our lowering, nf4="off"
      flock "$lock" timeout "${TRAJECTORY_TIMEOUT:-420}" python3 bench/trajectory.py --weights bnb --layers "${E2E_LAYERS:-32}" \
        --seq 2048 --steps 20 --out "$out" --configs eager,lowmem_bnb,lowmem_bnb_nf4off \
        --lowmem 'lowmem_bnb={}' --lowmem 'lowmem_bnb_nf4off={"nf4":"off"}' > "$out/trajectory.log" 2>&1
      tail -8 "$out/trajectory.log" ;;
    layers_all)  # each distinct layer compiled once (the default since 2026-12-07), cold: the headline lean row
      # (time to first step) beside Unsloth; the lean options at 32 and at 8 layers (first step against depth);
      # lean at 131072 tokens, 32 layers; a Llama-3-70B shape prepared from the meta device (no 16-bit
      # copy) at 8192 tokens, on cards of over 100 GiB. The first steps run unlocked: a 131072-token
      # first step slows the others' timed steps (bench/results/layers/2026-12-07T13/)
      timeout 120 python3 -m pytest -q -m gpu tests/test_layers.py -p no:cacheprovider > "$out/pytest_layers.log" 2>&1
      tail -1 "$out/pytest_layers.log"
      e2e --seqs 8192 --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out/a" > "$out/a.log" 2>&1 &
      e2e --seqs 8192 --configs unsloth --out "$out/b" > "$out/b.log" 2>&1 &
      e2e --seqs 8192 --configs lowmem_lean --out "$out/c" > "$out/c.log" 2>&1 &
      e2e --seqs 8192 --layers 8 --configs lowmem_lean --out "$out/d" > "$out/d.log" 2>&1 &
      e2e --seqs 131072 --warmup 1 --steps 1 --configs lowmem_lean --out "$out/e" > "$out/e.log" 2>&1 &
      if [ "$(python3 -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)')" -gt 100 ]; then
        timeout 420 python3 bench/prepare_memory.py --model llama3-70b --source meta --steps 3 --seq 8192 \
          --options '{"remat":"full","offload":"layers","logits":"drop","mlp_chunks":"auto"}' --out "$out/70b.json" > "$out/70b.log" 2>&1 &
      fi
      wait; rows "$out"/?/e2e.md; tail -4 "$out/70b.log" 2>/dev/null ;;
    first8192)  # time to first step with the GPU to itself: the headline lean row, then Unsloth (one after the other);
      # --cold: fresh compile caches per worker, so a machine that ran the stage before still measures a cold start;
      # --memory-trace: one more step each with the allocator's history, what is live at the peak and what the
      # reserved peak holds beyond it (bench/memory_trace.py); the lean row compiles our kernels on its warm-up thread
      # first the host link's copy rates (seconds): with the trace, what the reserved gap is made of (docs/training.md)
      OUT=$out timeout 60 python3 bench/host_link.py > "$out/host_link.txt" 2>&1; cat "$out/host_link.txt"
      e2e --cold --memory-trace --seqs 8192 --gpus 1 --lowmem "$lean_budget" --configs lowmem_lean_b6,unsloth --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md; grep -h "parts" "$out"/e2e.log; grep -h -A8 "^allocated peak" "$out"/e2e.log ;;
    frames8192)  # the first step with a Dynamo frame per decoder layer (layer_frames.py) beside the whole-model
      # capture and Unsloth, cold, one after the other (~2 min each), and the framed GPU tests first
      timeout 120 python3 -m pytest -q -m gpu tests/test_layer_frames.py -p no:cacheprovider > "$out/pytest_frames.log" 2>&1
      tail -1 "$out/pytest_frames.log"
      e2e --cold --seqs 8192 --gpus 1 --lowmem "$lean_budget_frames" --lowmem "$lean_budget" \
        --configs lowmem_lean_b6_frames,lowmem_lean_b6,unsloth --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md; grep -h "parts" "$out"/e2e.log ;;
    firststep)  # the first step, cold, one after the other: framed with our kernels warmed in worker processes
      # (warmup.py) and on the thread, then Unsloth; the GPU tests of both first
      timeout 150 python3 -m pytest -q -m gpu tests/test_warmup.py tests/test_layer_frames.py -p no:cacheprovider \
        > "$out/pytest_first.log" 2>&1
      tail -1 "$out/pytest_first.log"
      e2e --cold --seqs 8192 --gpus 1 --lowmem "$lean_budget_frames_proc" --lowmem "$lean_budget_frames" \
        --configs lowmem_lean_b6p_frames,lowmem_lean_b6_frames,unsloth --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md; grep -h "parts\|warm-up\|waited" "$out"/e2e.log ;;
    depth8frames)  # framed, cold: 8 layers against 32 (first step against depth), one after the other
      e2e --cold --seqs 8192 --layers 8 --gpus 1 --lowmem "$lean_budget_frames" --configs lowmem_lean_b6_frames \
        --out "$out/a" > "$out/a.log" 2>&1
      e2e --cold --seqs 8192 --gpus 1 --lowmem "$lean_budget_frames" --configs lowmem_lean_b6_frames \
        --out "$out/b" > "$out/b.log" 2>&1
      rows "$out"/?/e2e.md; grep -h "parts" "$out"/?/e2e.log ;;
    knob)  # the memory knob alone (lowmem_compile/knob.py) beside the hand-set lean row, one after the
      # other: 8192 tokens at "7GiB", then 2048 at "6GiB" (the prepared model: NF4, host embeddings, no K/V cache).
      # KNOB_BASELINE= (empty) leaves the lean row out, when first8192 ran it earlier in the same call; KNOB_2048=0
      # the 2048-token row
      e2e --seqs 8192 --gpus 1 --lowmem "$lean_budget" --lowmem 'lowmem_lean_knob7={"memory_budget":"7GiB"}' \
        --configs "${KNOB_BASELINE-lowmem_lean_b6,}lowmem_lean_knob7" --out "$out/a" > "$out/a.log" 2>&1
      [ "${KNOB_2048-1}" = 0 ] || e2e --seqs 2048 --gpus 1 --lowmem 'lowmem_lean_knob6={"memory_budget":"6GiB"}' \
        --configs lowmem_lean_knob6 --out "$out/b" > "$out/b.log" 2>&1
      rows "$out"/?/e2e.md ;;
    capped)  # issue 21's journey under a 10 GiB cap set before loading: the saved 16-bit model loaded onto the CPU,
      # prepare_ onto the GPU, the knob alone at "10GiB", 8192 tokens; then Unsloth under the same cap (one after
      # the other). Alone in a call: the folder is written first (~30 s), and the 2026-12-07T22 try, which built
      # the model from its config on the CPU instead, had not finished initializing it after 224 s
      e2e --cold --cap-gib 10 --seqs 8192 --gpus 1 --lowmem 'lowmem_prep_knob10={"memory_budget":"10GiB"}' \
        --configs lowmem_prep_knob10,unsloth --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    link)  # the host link's measured rates against the cost model's 50 GB/s (bench/host_link.py; seconds)
      OUT=$out flock "$lock" timeout 60 python3 bench/host_link.py > "$out/host_link.txt" 2>&1; cat "$out/host_link.txt" ;;
    cudnn_all)  # cuDNN's attention kernels at head dim 128 too (LOWMEM_CUDNN_ATTENTION=all; codegen/attention_cudnn.py),
      # beside the default (our Triton kernels there): the headline lean row at 8192, one after the other, then
      # the lean row at 131072 with cuDNN (lean128k is the Triton row: 2042.8 tokens/s, H100, 2026-12-07T22)
      e2e --seqs 8192 --gpus 1 --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out/a" > "$out/a.log" 2>&1
      LOWMEM_CUDNN_ATTENTION=all e2e --seqs 8192 --gpus 1 --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out/b" > "$out/b.log" 2>&1
      LOWMEM_CUDNN_ATTENTION=all e2e --seqs 131072 --warmup 1 --steps 1 --configs lowmem_lean --out "$out/c" > "$out/c.log" 2>&1
      rows "$out"/?/e2e.md ;;
    long128k)  # 131072 tokens, 32 layers, one row per call-sized slot (~4 min each, one after the other): the
      # lean options under a budget (`full+parked` may then save and park what is dear to recompute, attention's
      # output first, instead of recomputing it: lean128k's `full` recomputes every layer's attention, most of its
      # 64 s step on an H100, 2026-12-07T22), then the same with cuDNN's attention (LOWMEM_CUDNN_ATTENTION=all)
      e2e --seqs 131072 --warmup 1 --steps 1 --lowmem "$lean_b28" --configs lowmem_lean_b28 --out "$out/a" > "$out/a.log" 2>&1
      LOWMEM_CUDNN_ATTENTION=all e2e --seqs 131072 --warmup 1 --steps 1 --lowmem "$lean_b28" --configs lowmem_lean_b28 \
        --out "$out/b" > "$out/b.log" 2>&1
      rows "$out"/?/e2e.md ;;
    long128kframes)  # 131072 tokens, 32 layers, a frame per decoder layer (the causal mask left unbuilt: 16 GiB
      # of bools otherwise), cold; against long128k's whole capture (111.9 s to the first step, 2026-12-07T22)
      e2e --cold --seqs 131072 --warmup 1 --steps 1 --lowmem "$lean_b28_frames" --configs lowmem_lean_b28_frames \
        --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md; grep -h "parts" "$out"/e2e.log ;;
    depth8)  # the headline lean row at 8 layers, alone: its first step against first8192's 32-layer one
      e2e --cold --seqs 8192 --layers 8 --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md; grep -h "parts" "$out"/e2e.log ;;
    big70b)  # Llama-3-70B shape from the meta device (no 16-bit copy), lean options: 8192 then 32768 tokens
      # (measured at 8192 on an H100: 43.39 GiB, 1126 tokens/s, bench/results/layers/2026-12-07T19/; the CPU
      # planner predicts 49.53 GiB at 32768, bench/results/plan/2026-12-07-70b/)
      lean70='{"remat":"full","offload":"layers","logits":"drop","mlp_chunks":"auto"}'
      for seq in 8192 32768; do
        timeout 270 python3 bench/prepare_memory.py --model llama3-70b --source meta --steps 3 --seq "$seq" \
          --options "$lean70" --out "$out/70b_$seq.json" > "$out/70b_$seq.log" 2>&1
        tail -3 "$out/70b_$seq.log"
      done ;;
    recompile8192)  # right after e2e8192 on the same machine: the lean budget row again, its compile from the caches
      e2e --seqs 8192 --warmup 1 --steps 2 --lowmem "$lean_budget" --configs lowmem_lean_b6 --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md; grep -h "compiled in\|served from" "$out"/e2e.log ;;
    attn32k)
      # one parent each: a 32-layer compile plus four 32k steps is ~5 minutes, two in a row would not fit
      e2e --seqs 32768 --warmup 1 --steps 3 --configs lowmem_lean --out "$out/a" > "$out/a.log" 2>&1 &
      e2e --seqs 32768 --warmup 1 --steps 3 --lowmem "$lean_noattn" --configs lowmem_lean_noattn --out "$out/b" > "$out/b.log" 2>&1 &
      wait; rows "$out"/a/e2e.md "$out"/b/e2e.md ;;
    pieces32k)  # 32768 tokens, lean: "auto"'s 8 MLP pieces beside 16 (its cap before 2026-11-30)
      e2e --seqs 32768 --warmup 1 --steps 3 --configs lowmem_lean --out "$out/a" > "$out/a.log" 2>&1 &
      e2e --seqs 32768 --warmup 1 --steps 3 --lowmem "$lean_c16" --configs lowmem_lean_c16 --out "$out/b" > "$out/b.log" 2>&1 &
      wait; rows "$out"/a/e2e.md "$out"/b/e2e.md ;;
    nf4e2e2048)  # bitsandbytes QLoRA without checkpointing vs lowmem on the same 4-bit weights, 20 steps
      # lowmem_bnb_cg: CUDA graph replay (the step is host-bound here); lowmem_bnb_graph: nf4_matmul="graph"
      e2e --seqs 2048 --warmup 2 --steps 18 --profile --lowmem 'lowmem_bnb_graph={"nf4_matmul":"graph"}' \
        --lowmem 'lowmem_bnb_cg={"cudagraphs":true}' \
        --configs bnb_qlora,lowmem_bnb,lowmem_bnb_cg,lowmem_bnb_graph,lowmem_bnb_nf4off --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    nf4e2e2048cg)  # the CUDA-graph row beside bnb QLoRA again (E2E_LAYERS=8: 8 layers)
      e2e --seqs 2048 --warmup 2 --steps 18 --profile --lowmem 'lowmem_bnb_cg={"cudagraphs":true}' \
        --configs bnb_qlora,lowmem_bnb_cg --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    nf4e2e8192)  # the same at 8192 on the whole model: bnb QLoRA (~75 GiB) beside lowmem (~45 GiB), 20 steps each
      e2e --seqs 8192 --warmup 2 --steps 18 --profile --configs lowmem_bnb --out "$out/a" > "$out/a.log" 2>&1 &
      e2e --seqs 8192 --warmup 2 --steps 18 --configs bnb_qlora --out "$out/b" > "$out/b.log" 2>&1 &
      wait; rows "$out"/a/e2e.md "$out"/b/e2e.md ;;
    nf4e2e8192off)  # lowmem with nf4="off" on those weights at 8192 (each e2e config is a process of its own)
      e2e --seqs 8192 --warmup 2 --steps 18 --profile --configs lowmem_bnb_nf4off --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    e2e2048)
      e2e --seqs 2048 --lowmem 'lowmem_nofl={"fused_loss":"off"}' --lowmem 'lowmem_drop={"logits":"drop"}' \
        --lowmem 'lowmem_cg={"cudagraphs":true}' \
        --configs lowmem,lowmem_cg,lowmem_nofl,lowmem_drop --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    nohead)
      e2e --seqs 8192,2048 --configs lowmem --no-head --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    drop2048)
      e2e --seqs 2048 --lowmem 'lowmem_drop={"logits":"drop"}' --configs lowmem,lowmem_drop --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    lean128k)  # the lean setup at 131072 tokens: one compiling step, one timed (~6 min compile, ~1 min a step)
      e2e --seqs 131072 --warmup 1 --steps 1 --configs lowmem_lean --out "$out" > "$out/e2e.log.txt" 2>&1
      rows "$out"/e2e.md ;;
    sweep2048b)  # lowmem's budgets at 2048: predicted against measured peak
      OUT=$out timeout 570 python3 bench/remat_sweep.py --layers 32 --seq 2048 --parallel 2 --gpu-lock "$lock" \
        --time-limit "${TIME_LIMIT:-540}" --kinds lowmem --fixed "" --budgets "${BUDGETS_2048:-18,20,23,26}" > "$out/sweep.log" 2>&1
      tail -10 "$out/sweep.log" ;;
    sweep8192)
      OUT=$out timeout 570 python3 bench/remat_sweep.py --layers 32 --seq 8192 --parallel 2 --gpu-lock "$lock" \
        --time-limit 560 --kinds stock > "$out/sweep.log" 2>&1
      tail -14 "$out/sweep.log" ;;
    sweep8192b)
      OUT=$out timeout 570 python3 bench/remat_sweep.py --layers 32 --seq 8192 --parallel 2 --gpu-lock "$lock" \
        --time-limit "${TIME_LIMIT:-540}" --kinds lowmem --fixed "${FIXED-}" --budgets "${BUDGETS:-30,40,50,62}" \
        --previous "${PREVIOUS:-bench/results/remat/2026-11-29/remat_sweep.json}" > "$out/sweep.log" 2>&1
      tail -14 "$out/sweep.log" ;;
    *) echo "unknown stage $stage" >&2; return 2 ;;
  esac
  # Where $OUT is a folder a remote machine sends back (with a cap on the number of files), pack it.
  if [ -n "${OUT:-}" ] && [ "${PACK:-1}" != 0 ]; then
    tar -czf "$OUT/$stage.tgz" -C "$out" . && rm -rf "$out" && echo "packed: $OUT/$stage.tgz"
  fi
}

for s in "$@"; do stage "$s" > "/tmp/run_all_$s.txt" 2>&1 & done
wait
for s in "$@"; do echo "== $s"; cat "/tmp/run_all_$s.txt"; done
