"""examples/finetune.py: the held-out split, the periodic held-out loss, early stopping that puts the
best adapters back, and the script end to end on a tiny model."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = dict(steps=8, seq=16, batch=2, hidden=64, layers=1, head_dim=16, lr=1e-2, seed=0, device="cpu",
                eval_every=1, eval_batches=2, patience=2, min_delta=0.0, dtype=torch.float32)
    base.update(kw)
    return argparse.Namespace(**base)


def test_held_out_text_is_never_trained_on():
    data = torch.arange(1000)
    train, held = finetune.split(data, 0.1)
    assert train.numel() == 900 and held.numel() == 100 and torch.equal(torch.cat([train, held]), data)
    args = _args(seq=16, batch=2, eval_batches=3)
    batches = finetune.eval_batches(held, args, torch.device("cpu"))
    assert len(batches) == 3 and all(b["input_ids"].shape == (2, 16) for b in batches)
    assert all(int(b["input_ids"].min()) >= 900 for b in batches)  # windows of the held-out part only
    again = finetune.eval_batches(held, args, torch.device("cpu"))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_early_stopping_restores_the_best_adapters(monkeypatch):
    args = _args()
    model = finetune.build_model(args, torch.device("cpu"))
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])
    at_best = {}

    def fake_evaluate(model_, batches):
        loss = next(scripted)
        if loss == 2.0:
            at_best.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return loss

    monkeypatch.setattr(finetune, "evaluate", fake_evaluate)
    history: list = []
    data = torch.randint(0, 256, (4096,))
    losses = finetune.train(model, data, args, torch.device("cpu"), "test", held=[{}], history=history)
    assert [s for s, _ in history] == [1, 2, 3, 4] and len(losses) == 4  # stopped after 2 evaluations without a best
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, at_best[n]), n


def test_no_held_out_means_no_evaluation(monkeypatch):
    monkeypatch.setattr(finetune, "evaluate", lambda *a: pytest.fail("evaluated without held-out batches"))
    args = _args(steps=2)
    model = finetune.build_model(args, torch.device("cpu"))
    assert len(finetune.train(model, torch.randint(0, 256, (1024,)), args, torch.device("cpu"), "test")) == 2


@pytest.mark.slow
def test_the_script_runs_and_prints_the_held_out_loss():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune.py"), "--steps", "4", "--seq", "32", "--batch", "2",
         "--hidden", "64", "--head-dim", "16", "--layers", "1", "--eval-every", "2", "--eval-batches", "1",
         "--options", '{"inner": "eager"}', "--budget", "1GB"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step    2: train" in out.stdout and "held-out" in out.stdout and "lowmem report" in out.stdout
    assert "14 linear layers -> NF4" not in out.stdout and "7 linear layers -> NF4" in out.stdout
