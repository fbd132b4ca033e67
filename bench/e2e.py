"""Side-by-side LoRA/QLoRA fine-tuning benchmark: the same model shape, data and seed under each
configuration, each in its own process, so one's allocator state, compile caches or monkey patches
never leak into another's figures.

    python bench/e2e.py --seqs 2048,8192 --gpus 4                     # llama3-8b, all eight configs
    python bench/e2e.py --device cpu --model small --configs eager,lowmem --seqs 64 --steps 2

Configurations (a `lowmem*` name is a lowmem variant; `--lowmem NAME=JSON` adds or changes one,
e.g. with a pass of your own, named by import string from the repository root, docs/writing_a_pass.md:
`--lowmem 'lowmem_rms={"passes": ["examples.fused_add_rmsnorm:FusedAddRMSNorm"]}'`):

    eager               bf16 frozen base + peft LoRA (r=16, alpha 16, every projection)
    eager_gc            + Hugging Face gradient checkpointing (non-reentrant)
    inductor            torch.compile, default Inductor
    inductor_budget     + torch._functorch.config.activation_memory_budget (--budget)
    bnb_qlora           bitsandbytes NF4 + double quant + LoRA, no checkpointing
    bnb_qlora_gc        + gradient checkpointing (the QLoRA recipe)
    bnb_qlora_gc_liger  + Liger Kernel's Llama patch (RMSNorm, RoPE, SwiGLU, fused linear CE)
    unsloth             Unsloth FastLanguageModel, 4-bit, use_gradient_checkpointing="unsloth"
    lowmem              torch.compile(backend="lowmem", options=--lowmem-options)
    lowmem_base         lowmem with every pass off (the pipeline's own overhead)
    lowmem_lean         the least memory: remat full, offload, logits dropped, MLP in pieces, host embeddings
    lowmem_bnb          lowmem on the bitsandbytes-loaded model (its 4-bit layers lowered to our kernels);
    lowmem_bnb_nf4off   the same with nf4="off" (bitsandbytes' own 4-bit ops, traced as they are)

Every step: bf16 autocast, loss from the model's labels, backward, AdamW on the trainable parameters.
The model keeps Hugging Face's default `use_cache=True` (it returns a K/V cache: free for eager,
whose backward saves the same K/V, and 32 MiB a layer at 8192 tokens for lowmem, held until the
loop drops the outputs), except in the `lowmem_lean*` variants, which set `use_cache=False` as part
of their least-memory setup (from 2026-11-29 05:30 UTC on), as HF's own checkpointing does.
bnb and Unsloth load a saved folder of the same random model (written once per run to a temp dir).
The parent runs up to `--gpus` workers at once, one per GPU, and collects one JSON line from each; a
worker that fails (import error, OOM, crash, timeout) becomes a row with its error.
Output in `--out`: e2e.jsonl, e2e.md (table), e2e_peak_memory.png (bar plot), e2e.log (worker logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package and tests.models import
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    default_out_dir,
    environment,
    grouped_bar_plot,
    markdown_table,
    run_process_group,
    write_jsonl,
)

RESULT_MARKER = "E2E_RESULT "
GIB = 2**30

#: What the Llama-3 shapes share (the grouped K/V heads, vocabulary, rotary base and norm epsilon).
_LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
               rms_norm_eps=1e-5)
#: Llama shapes built from a config with random weights (no download).
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How a configuration loads, wraps and compiles the model."""

    loader: str = "hf"  # "hf" (built in memory), "bnb" (4-bit from the saved folder), "unsloth",
    # "prepare" (16-bit from the saved folder onto the CPU, then `lowmem_compile.prepare_` onto the
    # device layer by layer: the user's journey, and the same weights as the peers' rows)
    checkpointing: bool = False  # Hugging Face gradient checkpointing, non-reentrant
    compiler: str | None = None  # None, "inductor" or "lowmem"
    budget: bool = False  # stock activation_memory_budget around the compile
    liger: bool = False  # Liger Kernel's Llama patch, applied before the model is built

    @property
    def needs_folder(self) -> bool:
        return self.loader in ("bnb", "unsloth", "prepare")

    @property
    def needs_cuda(self) -> bool:
        return self.loader in ("bnb", "unsloth")


RECIPES: dict[str, Recipe] = {
    "eager": Recipe(),
    "eager_gc": Recipe(checkpointing=True),
    "inductor": Recipe(compiler="inductor"),
    "inductor_budget": Recipe(compiler="inductor", budget=True),
    "bnb_qlora": Recipe(loader="bnb"),
    "bnb_qlora_gc": Recipe(loader="bnb", checkpointing=True),
    "bnb_qlora_gc_liger": Recipe(loader="bnb", checkpointing=True, liger=True),
    "unsloth": Recipe(loader="unsloth"),
}
LOWMEM_RECIPE = Recipe(compiler="lowmem")
#: lowmem on the bitsandbytes-loaded model (the backend lowers its 4-bit layers unless `nf4="off"`):
#: variants named `lowmem_bnb*`.
LOWMEM_BNB_RECIPE = Recipe(loader="bnb", compiler="lowmem")
#: lowmem on a model loaded from the saved folder onto the CPU and moved by `prepare_` (NF4 on the
#: way, so no 16-bit copy on the device; host embeddings; no K/V cache): variants named
#: `lowmem_prep*`, the user's journey. (Built from the config on the CPU instead, Llama-3-8B's random
#: initialization alone outlasted a 224 s window on the GPU machine, 2026-12-07T22.)
LOWMEM_PREPARE_RECIPE = Recipe(loader="prepare", compiler="lowmem")
#: Built-in lowmem variants: the defaults (frozen linears quantized to NF4 by `quantize_` first);
#: every pass off with the bf16 weights (what the pipeline costs by itself; compare with `inductor`);
#: and the least memory (layers recomputed, their inputs in host memory, no logits returned: what
#: this loop, like the peers' fused-loss paths, never reads).
LOWMEM_VARIANTS: dict[str, dict[str, Any]] = {
    "lowmem": {},
    "lowmem_base": {"attention": "off", "nf4": "off", "remat": "none", "fused_loss": "off"},
    "lowmem_lean": {"remat": "full", "offload": "layers", "logits": "drop", "mlp_chunks": "auto"},  # + LEAN_PREFIX (below)
    "lowmem_bnb": {},
    "lowmem_bnb_nf4off": {"nf4": "off"},  # the same 4-bit weights through bitsandbytes' own ops
}
#: Variants whose frozen embedding tables also move to host memory (`offload_embeddings_`) and whose
#: model returns no K/V cache (`use_cache=False`): model-side settings, not backend options.
#: `lowmem_lean` and any variant named after it (`--lowmem lowmem_lean_noattn=...`), so a variation
#: of the lean setup differs only in its options.
LEAN_PREFIX = "lowmem_lean"
#: Variants named `..._frames` (`lowmem_lean_b6_frames`) also get a Dynamo frame per decoder layer
#: (`lowmem_compile.layer_frames_`, what `prepare_` installs): the route beside the whole-model capture.
FRAMES_SUFFIX = "_frames"
DEFAULT_CONFIGS = (*RECIPES, "lowmem")


def recipe_for(name: str) -> Recipe:
    if name in RECIPES:
        return RECIPES[name]
    if name.startswith("lowmem_bnb"):
        return LOWMEM_BNB_RECIPE
    if name.startswith("lowmem_prep"):
        return LOWMEM_PREPARE_RECIPE
    if name.startswith("lowmem"):
        return LOWMEM_RECIPE
    raise ValueError(f"unknown configuration {name!r}; choose from {sorted(RECIPES)} or a lowmem* variant")


# --------------------------------------------------------------------------------------------- worker


def llama_config(model: str, layers: int | None, seq: int):
    import transformers

    shape = dict(MODELS[model])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], seq)
    return transformers.LlamaConfig(
        **shape,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_model(config, device: str, seed: int):
    """The random bf16 model, allocated and initialised on `device` (seeded: every config gets the same weights)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


def save_model_folder(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Write the random model with a minimal tokenizer (Unsloth loads one) for the folder-loading peers."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    start = time.perf_counter()
    config = llama_config(args.model, args.layers, max(args.seq_list))
    build_model(config, args.device, args.seed).save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return {"saved": str(folder), "save_s": round(time.perf_counter() - start, 2)}


def add_lora(model, gradient_checkpointing: bool):
    """peft's LoRA r=16 on every projection, its random matrices drawn from the run's seed whatever
    drew before (building a model draws its weights, loading one from a folder draws nothing), so
    rows that loaded the same weights differently start from the same adapters."""
    import peft
    import torch

    from tests.models import LORA_TARGETS

    torch.manual_seed(torch.initial_seed())

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, lora)


def load_bnb(args: argparse.Namespace, recipe: Recipe):
    """The standard QLoRA recipe, with the non-quantized weights left in bf16 (no fp32 upcast)."""
    import torch

    if recipe.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    import transformers

    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa"
    )
    return add_lora(model, recipe.checkpointing)


def load_prepared(args: argparse.Namespace, recipe: Recipe):
    """The saved 16-bit folder loaded onto the CPU, adapters added, then `prepare_` onto the device
    (a layer at a time, NF4 on the way); each stage's time on stderr (the parent keeps it in e2e.log)."""
    import torch
    import transformers

    import lowmem_compile

    torch.manual_seed(args.seed)  # the seed the adapters are drawn from (add_lora)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map="cpu",
                                                              attn_implementation="sdpa")
    print(f"[{args.config}] loaded onto the CPU in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    model = add_lora(model, recipe.checkpointing)
    start = time.perf_counter()
    lowmem_compile.prepare_(model, device=args.device)
    print(f"[{args.config}] prepared onto {args.device} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model


def load_unsloth(args: argparse.Namespace, seq: int):
    from unsloth import FastLanguageModel  # before transformers: Unsloth patches it on import
    import torch

    from tests.models import LORA_TARGETS

    model, _ = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=args.seed,
    )
    FastLanguageModel.for_training(model)
    return model


def prepare(args: argparse.Namespace, recipe: Recipe, seq: int):
    """The trainable (and, for compiled configs, compiled) model of one configuration."""
    if recipe.loader == "unsloth":
        model = load_unsloth(args, seq)
    elif recipe.loader == "bnb":
        model = load_bnb(args, recipe)
    elif recipe.loader == "prepare":
        model = load_prepared(args, recipe)
    else:  # built from the config on the device
        model = add_lora(build_model(llama_config(args.model, args.layers, seq), args.device, args.seed), recipe.checkpointing)
    model.train()
    import torch

    # with --no-head the step trains the decoder alone (its last hidden states' mean as the loss)
    run = _decoder(model) if args.no_head else model
    if recipe.compiler == "inductor":
        return model, torch.compile(run)
    if recipe.compiler == "lowmem":
        import lowmem_compile

        options = json.loads(args.lowmem_options or "{}")
        if recipe.loader == "hf" and options.get("nf4", "auto") != "off":  # ("prepare" has quantized)
            lowmem_compile.quantize_(model)  # frozen linears to NF4; the backend lowers them
        if args.config.startswith(LEAN_PREFIX):
            lowmem_compile.offload_embeddings_(model)
            model.config.use_cache = False  # no K/V cache returned (the backward keeps 4-bit K/V)
        if args.config.endswith(FRAMES_SUFFIX):
            lowmem_compile.layer_frames_(model)
        return model, torch.compile(run, backend="lowmem", options=options)
    return model, run


def _decoder(model):
    """The decoder stack under the LM head (through a peft wrapper): what --no-head trains."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def _step_loss(args: argparse.Namespace, step_fn, input_ids):
    """The step's loss: the model's own, or with --no-head the mean of the last hidden states
    (its gradient is a constant, so it adds nothing to the peak: the head and loss are what is left out)."""
    if args.no_head:
        return step_fn(input_ids=input_ids).last_hidden_state.float().mean()
    return step_fn(input_ids=input_ids, labels=input_ids).loss


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train `--warmup` + `--steps` steps of one configuration at one length; never raises."""
    import logging

    # the compile's progress (passes, plans, code generation) goes with the step log to stderr
    logging.basicConfig(stream=sys.stderr, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lowmem_compile").setLevel(logging.INFO)
    seq = args.seq_list[0]
    recipe = recipe_for(args.config)
    row: dict[str, Any] = {"config": args.config, "seq": seq, "batch": args.batch, "model": args.model}
    row["layers"] = args.layers or MODELS[args.model]["num_hidden_layers"]
    row["no_head"] = args.no_head
    row["device"] = args.device
    if recipe.compiler == "lowmem":
        row["lowmem_options"] = json.loads(args.lowmem_options or "{}")
    if recipe.budget:
        row["activation_memory_budget"] = args.budget
    cuda = args.device == "cuda"
    try:
        if recipe.needs_cuda and not cuda:
            raise RuntimeError(f"{args.config} needs CUDA (its libraries have no CPU training path)")
        if recipe.loader == "unsloth":
            import unsloth  # noqa: F401  (first, before transformers)
        import torch

        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch sees no CUDA device")
            row["gpu"] = torch.cuda.get_device_name()
            if args.cap_gib:  # before anything is loaded: the whole journey under the cap
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
                row["cap_gib"] = args.cap_gib
            torch.cuda.reset_peak_memory_stats()
        model, step_fn, optimizer = load_for_training(lambda: prepare(args, recipe, seq), args.lr, row)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        input_ids = torch.randint(0, vocab, (args.batch, seq), generator=gen).to(args.device)
        if cuda:
            row["resident_bytes"] = torch.cuda.memory_allocated()
        _train(args, recipe, step_fn, optimizer, input_ids, row)
        if recipe.compiler == "lowmem":
            import lowmem_compile

            row["lowmem_report"] = lowmem_compile.last_report().to_dict()
    except BaseException as exc:  # an error row, whatever happened (OOM included)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        row["error"] = f"{type(exc).__name__}: {first_line}"[:400]
        row["oom"] = "OutOfMemoryError" in type(exc).__name__ or "out of memory" in str(exc)
        traceback.print_exc()
    if cuda and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            row["peak_run_bytes"] = torch.cuda.max_memory_allocated()
    return row


def load_for_training(build, lr: float, row: dict[str, Any]):
    """(model, step_fn) from `build()`, timed into `row["load_s"]`, and AdamW over its trainable
    parameters (their count into `row["trainable_params"]`)."""
    import torch

    start = time.perf_counter()
    model, step_fn = build()
    row["load_s"] = round(time.perf_counter() - start, 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    row["trainable_params"] = sum(p.numel() for p in trainable)
    return model, step_fn, torch.optim.AdamW(trainable, lr=lr)


@contextlib.contextmanager
def _exclusive(path: str):
    """Hold an exclusive lock on `path` (shared with other GPU jobs, e.g. `flock PATH cmd`)."""
    import fcntl

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _train(args, recipe: Recipe, step_fn, optimizer, input_ids, row: dict[str, Any]) -> None:
    import torch

    cuda = args.device == "cuda"
    budget = (
        torch._functorch.config.patch(activation_memory_budget=args.budget)
        if recipe.budget
        else contextlib.nullcontext()
    )
    losses, times = [], []
    triton_seconds = _time_triton()
    pinning_before = _host_pinning_seconds()
    with budget, contextlib.ExitStack() as held:
        for i in range(args.warmup + args.steps):
            if i == 1 and args.gpu_lock:
                held.enter_context(_exclusive(args.gpu_lock))  # the compile ran unlocked; the steps may not overlap
            if i == args.warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = _train_step(args, step_fn, optimizer, input_ids)
            losses.append(loss.detach().float().item())  # also waits for the step to finish
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if i == 0:
                row["first_step_s"] = round(times[0], 3)
                row["first_step_parts_s"] = _first_step_parts(triton_seconds)
                if pinning_before is not None:
                    row["first_step_parts_s"]["host_pinning"] = round(_host_pinning_seconds() - pinning_before, 2)
                if recipe.compiler == "lowmem":  # the backend's wait for its warm-up and pinning threads
                    import lowmem_compile

                    waited = lowmem_compile.last_report().to_dict()["warmup"]["waited_seconds"]
                    row["first_step_parts_s"]["lowmem_waited_for_threads"] = round(waited, 2)
                row["first_step_jit_kernels"] = list(triton_seconds["jit_kernels"])
                print(f"[{args.config} seq={input_ids.shape[-1]}] first step's parts (s): {row['first_step_parts_s']}; "
                      f"Triton compiles here (s): {row['first_step_jit_kernels']}", file=sys.stderr, flush=True)
            # progress on stderr (the parent keeps it in e2e.log): a long first step is the compile
            print(f"[{args.config} seq={input_ids.shape[-1]}] step {i + 1}/{args.warmup + args.steps}: "
                  f"{times[-1]:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        if cuda:  # the timed steps' peak, read before the profiled step (the profiler holds buffers of its own)
            row["peak_steps_bytes"] = torch.cuda.max_memory_allocated()
            # CUDA graph trees keep a replayed graph's tensors in a private pool outside the allocated
            # count; the reserved peak holds that pool (and, for every row, the allocator's slack)
            row["peak_steps_reserved_bytes"] = torch.cuda.max_memory_reserved()
            if args.profile:
                row["profile"] = _profile_step(args, step_fn, optimizer, input_ids)
            if args.memory_trace:
                from bench import memory_trace

                try:  # after the measured steps: a failure here must not cost the row
                    row["memory_trace"] = memory_trace.record_step(lambda: _train_step(args, step_fn, optimizer, input_ids))
                    print(memory_trace.table(row["memory_trace"]), file=sys.stderr, flush=True)
                except Exception as exc:  # noqa: BLE001
                    row["memory_trace"] = {"error": f"{type(exc).__name__}: {exc}"}
    timed = times[args.warmup :]
    row["losses"] = [round(x, 5) for x in losses]
    row["first_loss"], row["last_loss"] = losses[0], losses[-1]
    row["step_s_median"] = statistics.median(timed)
    row["tokens_per_s"] = round(input_ids.numel() / row["step_s_median"], 1)
    row["optimizer_state_bytes"] = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )


#: Seconds since the current `_train` began spent in Triton autotuners, and in Triton compiles run
#: in this process, with each compiled kernel's name and seconds (`_time_triton`).
_TRITON_SECONDS = {"triton_autotune": 0.0, "triton_jit": 0.0, "triton_main_thread": 0.0, "jit_kernels": []}


class _Depth(threading.local):
    active = False


#: Whether this thread is inside a timed Triton call already (a compile inside a tuning run counts once
#: on the main thread).
_TRITON_DEPTH = _Depth()


def _time_triton() -> dict:
    """The counters of `_TRITON_SECONDS`, reset to zero; they grow as the step runs. Parts of a first
    step that no compile metric of Dynamo's counts: the attention kernels tune on first use (so do
    some peers'), and every hand-written Triton kernel compiles in this process on its first launch
    (Inductor's own kernels compile in its worker processes, which these do not see). A compile
    inside a tuning run counts in both. `triton_main_thread` is the part of both spent on the training
    thread (what the first step waits for; the rest ran beside the compile, on the warm-up thread). The timers wrap `Autotuner._bench` and
    `triton.compiler.compile` once per process (bench/families.py trains several configurations in one)."""
    _TRITON_SECONDS.update(triton_autotune=0.0, triton_jit=0.0, triton_main_thread=0.0, jit_kernels=[])
    try:
        import triton.compiler
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return _TRITON_SECONDS

    def timer(fn, counter, name_of=None):
        def timed(*args, **kwargs):
            start, outermost = time.perf_counter(), not _TRITON_DEPTH.active
            _TRITON_DEPTH.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                _TRITON_SECONDS[counter] += seconds
                if outermost:
                    _TRITON_DEPTH.active = False
                    if threading.current_thread() is threading.main_thread():
                        _TRITON_SECONDS["triton_main_thread"] += seconds
                if name_of is not None and seconds >= 0.1:  # cache hits (Inductor loading its workers' kernels) stay unnamed
                    _TRITON_SECONDS["jit_kernels"].append((name_of(*args), round(seconds, 2)))

        timed.timed_by_e2e = True
        return timed

    if not getattr(Autotuner._bench, "timed_by_e2e", False):
        Autotuner._bench = timer(Autotuner._bench, "triton_autotune")
    if not getattr(triton.compiler.compile, "timed_by_e2e", False):
        # a kernel's launcher imports `compile` from triton.compiler when first bound: wrap it before any launch
        triton.compiler.compile = timer(triton.compiler.compile, "triton_jit", lambda src, *a: getattr(src, "name", "?"))
    return _TRITON_SECONDS


def _host_pinning_seconds() -> float | None:
    """Seconds PyTorch's pinned host allocator has spent creating blocks in this process (every
    thread), or None where it does not say (no CUDA, or a torch without the counter)."""
    import torch

    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    total = stats.get("host_alloc_time.total")
    return None if total is None else total / 1e6


def _first_step_parts(triton_seconds: dict) -> dict[str, float]:
    """Where the first step's time went: Dynamo's compile metrics (tracing, the backend, the lazily
    compiled backwards, guards), summed over every graph, each over half a second, and Triton's
    tuning and in-process compiles."""
    from torch._dynamo.utils import compilation_time_metrics

    parts = {name: round(sum(values), 2) for name, values in compilation_time_metrics.items() if sum(values) >= 0.5}
    parts["triton_autotune"] = round(triton_seconds["triton_autotune"], 2)
    parts["triton_jit"] = round(triton_seconds["triton_jit"], 2)
    parts["triton_main_thread"] = round(triton_seconds["triton_main_thread"], 2)
    return parts


def _train_step(args, step_fn, optimizer, input_ids):
    """One step: forward under bf16 autocast, backward, optimizer update; returns the loss."""
    import torch

    with torch.autocast(args.device, dtype=torch.bfloat16):
        loss = _step_loss(args, step_fn, input_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _profile_step(args, step_fn, optimizer, input_ids) -> dict[str, Any]:
    """One more step under torch.profiler, after the timed ones: the device time of its kernels and
    of its copies, and how many kernels the host launched. A step much longer than its kernels is
    bound by the host (launching) or by waits, not by the GPU's work."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        _train_step(args, step_fn, optimizer, input_ids)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in device if e.name.startswith(("Memcpy", "Memset"))]
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=15), file=sys.stderr, flush=True)
    copy_us = sum(e.device_time for e in copies)
    return {
        "step_s": round(wall, 4),
        "kernel_s": round((sum(e.device_time for e in device) - copy_us) / 1e6, 4),
        "copy_s": round(copy_us / 1e6, 4),
        "kernels": len(device) - len(copies),
    }


# --------------------------------------------------------------------------------------------- parent


@dataclass
class Job:
    config: str
    seq: int
    lowmem_options: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.config} seq={self.seq}"


def worker_command(args: argparse.Namespace, job: Job | None, model_dir: str | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model, "--device", args.device]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--lr", str(args.lr), "--seed", str(args.seed), "--budget", str(args.budget)]
    cmd += ["--seqs", ",".join(map(str, args.seq_list if job is None else [job.seq]))]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.gpu_lock:
        cmd += ["--gpu-lock", args.gpu_lock]
    if args.no_head:
        cmd.append("--no-head")
    if args.profile:
        cmd.append("--profile")
    if args.memory_trace:
        cmd.append("--memory-trace")
    if args.cap_gib:
        cmd += ["--cap-gib", str(args.cap_gib)]
    if model_dir is not None:
        cmd += ["--model-dir", model_dir]
    if job is None:
        return cmd + ["--save-model"]
    cmd += ["--config", job.config]
    if job.lowmem_options is not None:
        cmd += ["--lowmem-options", json.dumps(job.lowmem_options)]
    return cmd


def worker_env(args: argparse.Namespace, gpu: int, config: str | None, caches: Path | None = None) -> dict[str, str]:
    """The worker's environment; with `caches` (`--cold`), Inductor's and Triton's caches go to fresh
    folders under it, so the first step compiles everything even on a machine that ran it before."""
    env = dict(os.environ)
    if caches is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "inductor")
        env["TRITON_CACHE_DIR"] = str(caches / "triton")
    # Workers run in a scratch folder: make PYTHONPATH (e.g. a relative .peers/site) absolute first.
    paths = [str(ROOT), *(str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # built from configs; nothing to download
    if config == "unsloth":
        env["UNSLOTH_DISABLE_STATISTICS"] = "1"
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def parse_result(rc: int | None, out: str, err: str, timeout: float) -> dict[str, Any]:
    """The worker's JSON line, or an error row saying how the process ended."""
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join(err.strip().splitlines()[-3:])[-400:]
    reason = f"timed out after {timeout:.0f} s" if rc is None else f"worker exited with code {rc}"
    return {"error": f"{reason} without a result: {tail}"}


class Runner:
    """Runs jobs on `--gpus` slots; jobs that need the saved model folder wait until it is written.

    Workers run in `scratch` (peers write caches into their working directory), which also holds the
    model folder. Each finished row goes to `on_row` at once, so a run cut short keeps what it measured.
    """

    def __init__(self, args: argparse.Namespace, jobs: list[Job], scratch: Path, on_row):
        self.args, self.scratch, self.on_row = args, scratch, on_row
        self.rows: list[dict[str, Any]] = []
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.todo: queue.Queue[Job] = queue.Queue()
        # lengths in the order given (the first is the most wanted if --time-limit cuts the run short);
        # within one, jobs that need the saved model folder last, so the folder is written meanwhile
        order = {seq: i for i, seq in enumerate(args.seq_list)}
        for job in sorted(jobs, key=lambda j: (order[j.seq], recipe_for(j.config).needs_folder)):
            self.todo.put(job)
        self.total = len(jobs)
        self.deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
        self.folder_ready = threading.Event()
        self.folder_error: str | None = None
        self.model_dir = str(Path(args.model_dir).resolve()) if args.model_dir else str(scratch / "model")
        # On the CPU only the prepared rows read the folder (the peers' need CUDA and fail before loading it).
        self.needs_save = args.model_dir is None and any(
            recipe_for(j.config).needs_folder and (args.device == "cuda" or recipe_for(j.config).loader == "prepare")
            for j in jobs
        )
        if not self.needs_save:
            self.folder_ready.set()

    def run(self) -> list[dict[str, Any]]:
        slots = max(1, min(self.args.gpus, self.total))
        threads = [threading.Thread(target=self._slot, args=(gpu,)) for gpu in range(slots)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.rows

    def _execute(self, cmd: list[str], gpu: int, config: str | None, name: str) -> dict[str, Any]:
        timeout = self.args.timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout < 1:
                return {"error": "not run: --time-limit reached"}
        start = time.perf_counter()
        caches = Path(tempfile.mkdtemp(prefix="caches_", dir=self.scratch)) if self.args.cold else None
        rc, out, err = run_process_group(cmd, worker_env(self.args, gpu, config, caches), self.scratch, timeout)
        result = parse_result(rc, out, err, timeout)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["cold_caches"] = caches is not None
        with self.lock:
            tail = "\n".join(err.splitlines()[-80:])
            self.log.append(f"### {name} (slot {gpu}, rc={rc})\n$ {' '.join(cmd)}\n{tail}")
        return result

    def _slot(self, gpu: int) -> None:
        if gpu == 0 and self.needs_save:
            result = self._execute(worker_command(self.args, None, self.model_dir), gpu, None, "save model folder")
            self.folder_error = result.get("error")
            _progress(f"model folder {self.model_dir}: " + (self.folder_error or f"saved in {result.get('save_s')} s"))
            self.folder_ready.set()
        while True:
            try:
                job = self.todo.get_nowait()
            except queue.Empty:
                return
            if recipe_for(job.config).needs_folder:
                self.folder_ready.wait()
            if recipe_for(job.config).needs_folder and self.folder_error:
                row = {"error": f"model folder not written: {self.folder_error}"}
            else:
                row = self._execute(worker_command(self.args, job, self.model_dir), gpu, job.config, job.name)
            row.setdefault("config", job.config)
            row.setdefault("seq", job.seq)
            with self.lock:
                self.rows.append(row)
                _progress(f"[{len(self.rows)}/{self.total}] {job.name}: {_summary(row)}")
                self.on_row(self.rows, self.log)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gib(value: int | None) -> str | None:
    return None if value is None else f"{value / GIB:.2f}"


def _summary(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "ERROR " + row["error"]
    peak = _gib(row.get("peak_steps_bytes"))
    memory = f"peak {peak} GiB, " if peak else ""
    return f"{memory}{row['tokens_per_s']} tok/s, loss {row['last_loss']:.4f}, first step {row['first_step_s']} s"


def _peak_or_error(row: dict[str, Any]) -> float | str:
    return row["error"] if row.get("error") else row.get("peak_steps_bytes", 0) / GIB


def _ratio(value: float | None, base: float | None) -> str | None:
    return None if value is None or not base else f"{value / base:.2f}x"


def _predicted_over_measured(row: dict[str, Any]) -> str | None:
    """The cost model's peak against the measured one, like for like: this loop keeps only the loss
    (so the outputs-freed prediction), and the model leaves the optimizer's state out (so it is added)."""
    remat = row.get("lowmem_report", {}).get("remat", {})
    predicted = remat.get("predicted_peak_outputs_freed_bytes")
    if predicted is None or not row.get("peak_steps_bytes"):
        return None
    return f"{(predicted + row.get('optimizer_state_bytes', 0)) / row['peak_steps_bytes']:.3f}"


#: The first step's parts the table shows: Dynamo's trace, the backend (passes, AOTAutograd, our
#: partitioner, Inductor's forward code), the backwards compiled at the first backward, Triton tuning,
#: Triton compiles in the training process (the hand-written kernels; a compile while tuning counts in both),
#: and of those two the part on the training thread (the rest ran on the warm-up thread, beside the backend).
FIRST_STEP_PARTS = ("bytecode_tracing", "OutputGraph.call_user_compiler", "compile_fx.<locals>.bw_compiler", "triton_autotune",
                    "triton_jit", "triton_main_thread")


def _first_step_split(parts: dict[str, float] | None) -> str | None:
    if not parts:
        return None
    return " / ".join(f"{parts.get(name, 0.0):.1f}" for name in FIRST_STEP_PARTS)


def render_table(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    base = {r["seq"]: r for r in rows if r["config"] == "eager" and not r.get("error")}
    header = ["config", "seq", "peak steps GiB", "vs eager", "peak run GiB", "reserved GiB", "tokens/s", "vs eager"]
    header += ["predicted / measured peak", "first step s", "of it: trace / backend / backwards / tuning / jit / tuning+jit on the step's thread s", "last loss", "error"]
    body = []
    for r in rows:
        b = base.get(r["seq"], {})
        body.append(
            [
                r["config"],
                r["seq"],
                _gib(r.get("peak_steps_bytes")),
                _ratio(r.get("peak_steps_bytes"), b.get("peak_steps_bytes")),
                _gib(r.get("peak_run_bytes")),
                _gib(r.get("peak_steps_reserved_bytes")),
                r.get("tokens_per_s"),
                _ratio(r.get("tokens_per_s"), b.get("tokens_per_s")),
                _predicted_over_measured(r),
                r.get("first_step_s"),
                _first_step_split(r.get("first_step_parts_s")),
                None if r.get("last_loss") is None else f"{r['last_loss']:.4f}",
                r.get("error"),
            ]
        )
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    layers = args.layers or MODELS[args.model]["num_hidden_layers"]
    intro = (
        f"# End-to-end LoRA/QLoRA step: {args.model} ({layers} layers), batch {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps"
        f"{' (--no-head: the decoder alone, no LM head or loss)' if getattr(args, 'no_head', False) else ''}\n\n"
        f"Device: {env['gpu'] or args.device}. {versions}. Python {env['python']}. {env['date']}.\n\n"
        "Peak steps: max allocated over the timed steps (weights, optimizer state and activations); "
        "peak run: from before loading to the end. Reserved: the allocator's reserved peak over the timed "
        "steps (it holds CUDA graph pools, which the allocated peaks do not count). Tokens/s: median timed step. "
        "First step includes compilation (its parts: Dynamo's trace, the backend, the backwards compiled at "
        "the first backward, Triton's autotuners; each summed over the step's graphs). Predicted / measured: lowmem's cost model (outputs freed "
        "before the backward, as this loop does, plus the optimizer's state) over peak steps.\n\n"
    )
    return intro + markdown_table(header, body)


def lowmem_variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Built-in variants, then `--lowmem NAME=JSON`, then `--lowmem-options` for `lowmem`; all validated."""
    variants = dict(LOWMEM_VARIANTS)
    specs = list(args.lowmem)
    if args.lowmem_options is not None:
        specs.append(f"lowmem={args.lowmem_options}")
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name.startswith("lowmem"):
            raise SystemExit(f"--lowmem {spec!r}: write NAME=JSON with a name starting with 'lowmem'")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--lowmem {name}: options are not JSON ({exc})") from exc
        from lowmem_compile import Options

        try:
            Options.from_user(options)
        except ValueError as exc:
            raise SystemExit(f"--lowmem {name}: {exc}") from exc
        variants[name] = options
    return variants


def run_parent(args: argparse.Namespace) -> int:
    variants = lowmem_variants(args)
    for name in args.config_list:
        if name.startswith("lowmem") and name not in variants:
            raise SystemExit(f"lowmem variant {name!r} has no options; add --lowmem {name}='{{...}}'")
        recipe_for(name)
    jobs = [Job(c, s, variants.get(c)) for s in args.seq_list for c in args.config_list]
    out_dir = Path(args.out) if args.out else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    order = {(j.config, j.seq): i for i, j in enumerate(jobs)}
    layers = args.layers or MODELS[args.model]["num_hidden_layers"]
    title = f"{args.model} ({layers} layers), batch {args.batch}, {env['gpu'] or args.device}"

    def write(rows: list[dict[str, Any]], log: list[str]) -> str:
        rows = sorted(rows, key=lambda r: order[(r["config"], r["seq"])])
        for row in rows:
            row.update(env, gpu=row.get("gpu") or env["gpu"])
        write_jsonl(out_dir / "e2e.jsonl", rows)
        table = render_table(rows, env, args)
        plot_note = "no peak-memory figures (CPU or every config failed): no plot"
        if any(r.get("peak_steps_bytes") for r in rows):
            plot_note = grouped_bar_plot(
                groups=list(dict.fromkeys(r["config"] for r in rows)),
                series={
                    f"seq {seq}": {r["config"]: _peak_or_error(r) for r in rows if r["seq"] == seq}
                    for seq in sorted({r["seq"] for r in rows})
                },
                path=out_dir / "e2e_peak_memory.png",
                title=title,
                ylabel="peak allocated over timed steps (GiB)",
            )
        plot_line = plot_note or "![peak memory](e2e_peak_memory.png)"
        (out_dir / "e2e.md").write_text(f"{table}\n{plot_line}\n")
        (out_dir / "e2e.log").write_text("\n\n".join(log) + "\n")
        return table

    scratch = Path(tempfile.mkdtemp(prefix="e2e_"))
    runner = Runner(args, jobs, scratch, write)
    try:
        rows = runner.run()
    finally:
        if args.keep_scratch:
            _progress(f"scratch folder kept: {scratch}")
        else:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    print(write(rows, runner.log), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated configurations")
    p.add_argument("--seqs", default="2048", help="comma-separated sequence lengths (a worker per config and length)")
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gpus", type=int, default=1, help="workers at once, one per GPU (on CPU: processes at once)")
    p.add_argument("--budget", type=float, default=0.5, help="activation_memory_budget of inductor_budget")
    p.add_argument("--lowmem-options", default=None, help="JSON options of the `lowmem` config")
    p.add_argument("--lowmem", action="append", default=[], metavar="NAME=JSON", help="add or change a lowmem variant")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results)")
    p.add_argument("--model-dir", default=None, help="a saved folder of the same model to reuse (bnb, unsloth)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (model folder, worker caches)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is killed")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run, then error rows")
    p.add_argument("--cold", action="store_true",
                   help="each worker compiles into fresh Inductor and Triton cache folders (a cold first step on any machine)")
    p.add_argument(
        "--no-head", action="store_true",
        help="train the decoder alone (loss: mean of its last hidden states): the peak without the LM head and loss",
    )
    p.add_argument(
        "--profile", action="store_true",
        help="one more step under torch.profiler (CUDA): kernel and copy device time, kernel count, in the row and the log",
    )
    p.add_argument(
        "--cap-gib", type=float, default=None,
        help="cap each worker's GPU memory (set_per_process_memory_fraction) before it loads anything",
    )
    p.add_argument(
        "--memory-trace", action="store_true",
        help="one more step with the allocator's history on (CUDA): the blocks live at its allocated peak and "
             "its reserved peak (bench/memory_trace.py), in the row and the log",
    )
    p.add_argument(
        "--gpu-lock", default=None, metavar="PATH",
        help="lock file held exclusively for every step after the first (compiles overlap other GPU jobs)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-model", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.seq_list = [int(s) for s in args.seqs.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seqs {args.seqs!r}: write comma-separated integers like 2048,8192")
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    counts = [(args.batch, "--batch"), (args.steps, "--steps"), (args.gpus, "--gpus")]
    for value, flag in counts + [(s, "--seqs") for s in args.seq_list]:
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the first step compiles and is never timed")
    if not args.seq_list or not args.config_list:
        p.error("--seqs and --configs must each name at least one value")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.worker:
        return run_parent(args)
    if args.save_model:
        try:
            result = save_model_folder(args, Path(args.model_dir))
        except BaseException as exc:
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    else:
        result = run_worker(args)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
