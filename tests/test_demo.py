"""The character-level demo (python -m fusedattn.demo), in its seconds-long --smoke form."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import fusedattn
from fusedattn import demo

PNG = b"\x89PNG\r\n\x1a\n"


def test_task_reverses_each_word():
    cfg = demo.PRESETS["quick"]
    rng = random.Random(3)
    for n in (20, 100, 300):
        src, tgt = demo.make_line(rng, n, cfg)
        assert len(src) == len(tgt) <= n and len(src) > n - cfg.max_word - 2
        assert [i for i, c in enumerate(src) if c == " "] == [i for i, c in enumerate(tgt) if c == " "]
        assert tgt.split(" ") == [w[::-1] for w in src.split(" ")]
        assert all(cfg.min_word <= len(w) <= cfg.max_word for w in src.split(" "))


def test_greedy_decode_is_consistent_with_one_call():
    """Step-by-step greedy decoding over the precompute cache = one teacher-forced call on its output."""
    torch.manual_seed(0)
    cfg = demo.PRESETS["smoke"]
    model = demo.Seq2Seq(cfg).eval()
    src, tgt, lengths, _ = demo.make_batch(random.Random(0), 4, cfg)
    pred = model.greedy(src, lengths)
    assert pred.shape == src.shape
    with torch.no_grad():
        logits = model(src, lengths, pred)
    assert torch.equal(logits.argmax(-1), pred)


def test_demo_smoke_cli(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "fusedattn.demo", "--smoke", "--out", str(out),
                           "--threads", "1"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "held-out character accuracy" in proc.stderr and "train [" in proc.stderr
    for name in ("alignment.png", "alignment_full.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy", "train_seconds", "backend", "memory", "teacher_forced_accuracy", "config"):
        assert key in summary, key
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["train_seconds"] > 0
    usable = [b for b, why in fusedattn.available_backends().items() if why is None]
    assert summary["backend"] in usable
    mem = summary["memory"]
    assert "clear_refs" in mem["method"]
    expected = ["reference"] + (["cpu"] if "cpu" in usable else [])
    for name in expected:
        assert mem[name]["backend"] == name
        assert mem[name]["peak_rss_growth_mb"] >= 0 and mem[name]["peak_rss_mb"] > 0


def test_demo_is_reproducible(tmp_path):
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:
        a = demo.run(demo.PRESETS["smoke"], str(tmp_path / "a"), threads=1, measure=False)
        b = demo.run(demo.PRESETS["smoke"], str(tmp_path / "b"), threads=1, measure=False)
    finally:
        torch.set_num_threads(threads)
    assert a["final_loss"] == b["final_loss"] and a["accuracy"] == b["accuracy"]
    assert a["example"] == b["example"] and a["memory"] is None
