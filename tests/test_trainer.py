"""Hugging Face `Trainer` and TRL's `SFTTrainer` on a lowmem-compiled tiny Llama with LoRA (CPU,
`inner="eager"`): gradient accumulation, evaluation, adapter saving, resuming, packing; options pass
through `model.compile`. The routes that do not work are checked to fail still, as
lowmem_compile/trainer.py and the README say."""

from __future__ import annotations

import random

import pytest
import torch

import lowmem_compile
from lowmem_compile.trainer import LowmemCallback, is_compiled
from tests.models import LORA_TARGETS, tiny_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

OPTIONS = {"inner": "eager", "remat": "full"}


def _model(**overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", **overrides))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    lowmem_compile.prepare_(model)
    return model


def _rows(n: int, seq: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 256, (seq,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(seq, dtype=torch.long),
                     "source": 0})  # a column the model does not take: the Trainer must drop it
    return rows


def _args(out, **kw):
    base = dict(per_device_train_batch_size=2, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
                max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-3, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def test_trainer_accumulates_evaluates_saves_and_resumes(tmp_path):
    model = _model()
    model.compile(backend="lowmem", options=OPTIONS)
    assert is_compiled(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = LowmemCallback()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_rows(16),
                                   eval_dataset=_rows(4, seed=1), callbacks=[callback])
    trainer.train()
    logs = trainer.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e]
    evals = [e["eval_loss"] for e in logs if "eval_loss" in e]
    assert len(losses) == 2 and len(evals) == 1 and all(abs(x - 5.55) < 0.2 for x in losses + evals)
    assert trainer.state.global_step == 2
    # the compiled graphs ran, with the options given to model.compile
    report = lowmem_compile.last_report()
    assert report.total("nf4").lowered > 0 and report.total("remat").policy == "full"
    # training changed the adapters (LoRA B starts at zero)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed
    assert len(callback.released) == 2  # after the first step and the first evaluation
    # the adapter checkpoint is peft's, and training resumes from it
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=3, eval_strategy="no", save_strategy="no"),
                                   train_dataset=_rows(16))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3]  # 1, 2 from the checkpoint


def test_backend_name_in_training_arguments_fails_in_accelerate(tmp_path):
    """accelerate's DynamoBackend enum has no "lowmem": the Trainer cannot compile with our backend
    itself (if this starts passing, update the README's Trainer section and lowmem_compile/trainer.py)."""
    args = _args(tmp_path, torch_compile=True, torch_compile_backend="lowmem")
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        transformers.Trainer(model=_model(), args=args, train_dataset=_rows(4))


def test_torch_compile_wrapper_loses_the_columns(tmp_path):
    """`torch.compile(model)` hides the model's forward signature: the Trainer drops every column."""
    datasets = pytest.importorskip("datasets")
    compiled = torch.compile(_model(), backend="lowmem", options=OPTIONS)
    rows = _rows(4)
    ds = datasets.Dataset.from_dict({k: [r[k].tolist() if torch.is_tensor(r[k]) else r[k] for r in rows] for k in rows[0]})
    trainer = transformers.Trainer(model=compiled, args=_args(tmp_path, eval_strategy="no"), train_dataset=ds)
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        trainer.train()


def test_callback_warns_about_an_uncompiled_model_and_checkpointing(tmp_path):
    model = _model()
    with pytest.warns(UserWarning, match=r"model.compile\(backend='lowmem'"):
        LowmemCallback().on_train_begin(_args(tmp_path), None, None, model=model)
    model.compile(backend="lowmem", options=OPTIONS)
    with pytest.warns(UserWarning, match="gradient_checkpointing is on"):
        LowmemCallback().on_train_begin(_args(tmp_path, gradient_checkpointing=True), None, None, model=model)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, " ": 3, **{chr(97 + i): 4 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token a character
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
                     for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _sft(tmp_path, packing: bool, **kw):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = _model(pad_token_id=0, eos_token_id=1)
    # SFTConfig turns on gradient checkpointing by default; lowmem's remat pass does that job
    model.compile(backend="lowmem", options=OPTIONS)
    extra = dict(packing=True, pad_to_multiple_of=64) if packing else dict(packing=False, pad_to_multiple_of=32)
    base = dict(per_device_train_batch_size=2, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
                max_steps=2, logging_steps=1, report_to=[], use_cpu=True, max_length=32, learning_rate=1e-3,
                save_strategy="no", eval_strategy="no", seed=0, gradient_checkpointing=False, **extra)
    base.update(kw)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(str(tmp_path), **base),
                             train_dataset=datasets.Dataset.from_dict({"text": _texts(24)}),
                             eval_dataset=datasets.Dataset.from_dict({"text": _texts(4, seed=1)}),
                             processing_class=_tokenizer())
    trainer.train()
    return trainer


def test_sft_trainer_accumulates(tmp_path):
    trainer = _sft(tmp_path, packing=False)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(abs(x - 5.55) < 0.3 for x in losses)
    assert lowmem_compile.last_report().total("nf4").lowered > 0


@pytest.mark.slow
def test_sft_trainer_packs_evaluates_and_saves(tmp_path):
    trainer = _sft(tmp_path, packing=True, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    logs = trainer.state.log_history
    assert len([e for e in logs if "loss" in e]) == 2 and len([e for e in logs if "eval_loss" in e]) == 1
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert lowmem_compile.last_report().total("attention").packed_masks > 0  # packed sequences kept apart
