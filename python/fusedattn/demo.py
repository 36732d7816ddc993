"""Character-level encoder-decoder with fused additive attention: ``python -m fusedattn.demo``.

The task: reverse every word of a line of random lowercase "words" (2-7 letters),
keeping the spaces in place (``"the cat sat" -> "eht tac tas"``). Lines are 90-120
characters (``--quick``) or 250-300 (the default, full run), far more than a plain
encoder-decoder carries in one state, so the decoder has to learn where to look; the
alignment it finds is the diagonal of the line broken into one anti-diagonal block
per word, like the local reorderings of the classic translation alignment figure.

Model: character embedding -> bidirectional LSTM encoder; an LSTM decoder over the
previous (teacher-forced) character; ``fusedattn.nn.AdditiveAttention`` from each
decoder state over the encoder states; a small MLP over ``[state; context]``
predicts the character. As a location cue, queries and memory carry one extra
feature, the position divided by ``position_scale`` (decoder step ``i``, source
position ``j``): the additive score can then express "j at or after i", which cuts
the search at each word start from the whole line to the next word. (Without it, a
700-step run on 80-100-character lines reached 0.42 greedy accuracy, repeating and
skipping words; with it, 0.999.)
All decoder steps attend in one fused call during training (no ``Lq x Lk`` weights
are stored); held-out lines are decoded greedily, one step at a time, from the
``precompute`` cache. The output has the source's length, so the decoder runs
exactly ``len(source)`` steps.

Outputs in ``--out DIR``: ``alignment.png`` (the first ``plot_chars`` characters of
one held-out line, readable), ``alignment_full.png`` (the whole line),
``summary.json`` (accuracy, timing, backend, and the peak memory of the attention
forward + backward on one training batch with the fused backend and with the
reference path, each in a fresh subprocess, as the growth of the RSS high-water
mark, reset just before the call, over the RSS then).

``--quick`` is sized to finish in under 3 minutes on a 2-core CPU with the fused
``cpu`` backend; ``--smoke`` is a seconds-long run for tests (its accuracy means
nothing). Seeds are fixed: the data and the initialisation are the same on every run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import backends as _backends
from .api import available_backends
from .nn import AdditiveAttention

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
PAD, BOS = 0, 1
ITOS = ["<pad>", "<s>", " ", *ALPHABET]
STOI = {c: i for i, c in enumerate(ITOS)}
VOCAB = len(ITOS)


@dataclass
class Config:
    min_len: int = 90            # line length in characters, drawn uniformly from [min_len, max_len]
    max_len: int = 120
    min_word: int = 2
    max_word: int = 7
    batch: int = 32
    steps: int = 360
    lr: float = 6e-3
    emb: int = 32
    rnn: str = "lstm"            # "lstm" or "gru" for the encoder and the decoder
    enc_hidden: int = 64         # per direction; the memory has 2 * enc_hidden features
    dec_hidden: int = 128
    attn_dim: int = 64
    position_scale: float = 3.0  # > 0: append position / position_scale to queries and memory (0: off)
    eval_lines: int = 64
    plot_chars: int = 48         # alignment.png shows the first plot_chars characters
    seed: int = 0


PRESETS = {
    "smoke": Config(min_len=20, max_len=30, batch=8, steps=6, emb=8, enc_hidden=8, dec_hidden=16,
                    attn_dim=8, eval_lines=4, plot_chars=30),
    "quick": Config(),
    "full": Config(min_len=250, max_len=300, steps=800),
}


# ------------------------------------------------------------------------------------ data


def make_line(rng: random.Random, n_chars: int, cfg: Config) -> tuple[str, str]:
    """A line of random words with at most ``n_chars`` characters, and its word-reversed target."""
    words, used = [], -1
    while True:
        w = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(cfg.min_word, cfg.max_word)))
        if used + 1 + len(w) > n_chars:
            break
        words.append(w)
        used += 1 + len(w)
    return " ".join(words), " ".join(w[::-1] for w in words)


def make_batch(rng: random.Random, n: int, cfg: Config):
    """-> (src (n, L) long, tgt (n, L) long, lengths (n,) long, pairs) padded with PAD."""
    pairs = [make_line(rng, rng.randint(cfg.min_len, cfg.max_len), cfg) for _ in range(n)]
    L = max(len(s) for s, _ in pairs)
    src = torch.full((n, L), PAD, dtype=torch.long)
    tgt = torch.full((n, L), PAD, dtype=torch.long)
    for b, (s, t) in enumerate(pairs):
        src[b, :len(s)] = torch.tensor([STOI[c] for c in s])
        tgt[b, :len(t)] = torch.tensor([STOI[c] for c in t])
    lengths = torch.tensor([len(s) for s, _ in pairs], dtype=torch.long)
    return src, tgt, lengths, pairs


# ------------------------------------------------------------------------------------ model


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Config, backend: str = "auto"):
        super().__init__()
        self.pos_scale = cfg.position_scale
        npos = 1 if cfg.position_scale > 0 else 0
        self.emb = nn.Embedding(VOCAB, cfg.emb, padding_idx=PAD)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cfg.rnn]
        self.encoder = rnn(cfg.emb, cfg.enc_hidden, batch_first=True, bidirectional=True)
        self.decoder = rnn(cfg.emb, cfg.dec_hidden, batch_first=True)
        mem = 2 * cfg.enc_hidden + npos
        self.attention = AdditiveAttention(cfg.dec_hidden + npos, mem, cfg.attn_dim, backend=backend)
        self.readout = nn.Sequential(nn.Linear(cfg.dec_hidden + npos + mem, cfg.dec_hidden), nn.Tanh(),
                                     nn.Linear(cfg.dec_hidden, VOCAB))

    def _with_position(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Append the feature position / position_scale to (B, L, F) features (a location cue)."""
        if self.pos_scale <= 0:
            return x
        pos = torch.arange(start, start + x.shape[1], dtype=x.dtype) / self.pos_scale
        return torch.cat([x, pos.view(1, -1, 1).expand(x.shape[0], -1, 1)], dim=-1)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(src), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return self._with_position(out)                                 # (B, L, 2*enc_hidden [+1])

    def decoder_states(self, prev: torch.Tensor, h=None, start: int = 0):
        out, h = self.decoder(self.emb(prev), h)
        return self._with_position(out, start), h                       # (B, Lq, dec_hidden [+1]), h

    def forward(self, src, lengths, tgt, *, return_weights: bool = False):
        """Teacher forcing: all steps at once. -> logits (B, L, VOCAB) [, weights (B, 1, L, L)]."""
        memory = self.encode(src, lengths)
        prev = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
        states, _ = self.decoder_states(prev)
        res = self.attention(states, memory, lengths, return_weights=return_weights)
        context, weights = res if return_weights else (res, None)
        logits = self.readout(torch.cat([states, context], dim=-1))
        return (logits, weights) if return_weights else logits

    @torch.no_grad()
    def greedy(self, src, lengths) -> torch.Tensor:
        """Free-running decoding, one step at a time over the precomputed source. -> (B, L)."""
        memory = self.encode(src, lengths)
        cache = self.attention.precompute(memory, lengths)
        prev = torch.full((src.shape[0], 1), BOS, dtype=torch.long)
        h, out = None, []
        for i in range(src.shape[1]):
            state, h = self.decoder_states(prev, h, start=i)            # (B, 1, query_dim)
            context = self.attention(state[:, 0], cache)               # one step: (B, key_dim)
            prev = self.readout(torch.cat([state[:, 0], context], dim=-1)).argmax(-1, keepdim=True)
            out.append(prev)
        return torch.cat(out, dim=1)


def char_accuracy(pred: torch.Tensor, tgt: torch.Tensor) -> float:
    valid = tgt != PAD
    return float(((pred == tgt) & valid).sum()) / max(1, int(valid.sum()))


def decode(ids) -> str:
    return "".join(ITOS[i] if i > BOS else "" for i in ids)


# ------------------------------------------------------------------------------------ progress


class Progress:
    """A stderr progress bar: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.t0 = total, desc, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1

    def update(self, n: int, info: str = "") -> None:
        elapsed = time.perf_counter() - self.t0
        frac = n / max(1, self.total)
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"{self.desc} [{bar}] {n}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s {info}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
            if n >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif int(10 * frac) > self.last_decile or n >= self.total:
            self.last_decile = int(10 * frac)
            print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_child(batch_path: str, backend: str) -> dict:
    """In a fresh process: one attention forward + backward on the saved batch.

    The peak is the kernel's RSS high-water mark (VmHWM), reset just before the call by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0), minus the RSS (VmRSS) at that point.
    """
    torch.manual_seed(0)
    saved = torch.load(batch_path, weights_only=False)
    cfg = Config(**saved["config"])
    npos = 1 if cfg.position_scale > 0 else 0
    att = AdditiveAttention(cfg.dec_hidden + npos, 2 * cfg.enc_hidden + npos, cfg.attn_dim, backend=backend)
    att.load_state_dict(saved["attention"])
    states = saved["states"].requires_grad_(True)
    memory = saved["memory"].requires_grad_(True)
    lengths = saved["lengths"]
    # warm up on a 1-line slice so lazy imports and one-off allocations are not counted
    att(states[:1, :2], memory[:1, :2], lengths[:1].clamp(max=2)).sum().backward()
    states.grad = memory.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    att(states, memory, lengths).square().sum().backward()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"backend": _backends.select(backend, "additive", states, memory, memory),
            "peak_rss_growth_mb": round((peak - before) / 1024, 1),
            "rss_before_mb": round(before / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "seconds": round(seconds, 4)}


def measure_memory(model: Seq2Seq, src, tgt, lengths, cfg: Config, backends: list[str]) -> dict:
    """Peak memory of the attention forward + backward on one batch, per backend, each in a new process."""
    with torch.no_grad():
        memory = model.encode(src, lengths)
        prev = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
        states, _ = model.decoder_states(prev)
    B, L = src.shape
    result = {"method": "fresh subprocess per backend; AdditiveAttention forward + backward on one "
                        "training batch; peak_rss_growth_mb = RSS high-water mark (VmHWM, reset via "
                        "/proc/self/clear_refs just before the call) minus the RSS at that point",
              "batch": {"B": B, "Lq": L, "Lk": L, "attn_dim": cfg.attn_dim,
                        "value_dim": int(memory.shape[-1])}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.pt")
        torch.save({"config": asdict(cfg), "attention": model.attention.state_dict(),
                    "states": states, "memory": memory, "lengths": lengths}, path)
        for name in backends:
            proc = subprocess.run([sys.executable, "-m", "fusedattn.demo", "--_measure", path,
                                   "--backend", name], capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                result[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------ main


def run(cfg: Config, out_dir: str, backend: str = "auto", threads: int | None = None,
        measure: bool = True) -> dict:
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data_rng = random.Random(cfg.seed)
    eval_src, eval_tgt, eval_len, eval_pairs = make_batch(random.Random(cfg.seed + 1), cfg.eval_lines, cfg)

    model = Seq2Seq(cfg, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    used = _backends.select(backend, "additive", torch.zeros(1, 1, 1, cfg.attn_dim),
                            torch.zeros(1, 1, 1, cfg.attn_dim), torch.zeros(1, 1, 1, 2 * cfg.enc_hidden))
    print(f"fusedattn demo: reverse each word, lines of {cfg.min_len}-{cfg.max_len} characters; "
          f"attention backend {used!r} (asked {backend!r}); {torch.get_num_threads()} threads",
          file=sys.stderr, flush=True)

    bar = Progress(cfg.steps, "train")
    t0 = time.perf_counter()
    loss_avg = None
    first_batch = None
    for step in range(cfg.steps):
        src, tgt, lengths, _ = make_batch(data_rng, cfg.batch, cfg)
        if first_batch is None:
            first_batch = (src, tgt, lengths)
        logits = model(src, lengths, tgt)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.update(step + 1, f"loss {loss_avg:.3f}")
    train_seconds = time.perf_counter() - t0

    model.eval()
    t1 = time.perf_counter()
    pred = model.greedy(eval_src, eval_len)
    accuracy = char_accuracy(pred, eval_tgt)
    with torch.no_grad():
        tf_accuracy = char_accuracy(model(eval_src, eval_len, eval_tgt).argmax(-1), eval_tgt)
    eval_seconds = time.perf_counter() - t1
    print(f"held-out character accuracy {accuracy:.4f} (greedy decoding, {cfg.eval_lines} lines), "
          f"teacher-forced {tf_accuracy:.4f}; trained {train_seconds:.1f}s", file=sys.stderr, flush=True)

    # alignment of one held-out line: the greedy output re-scored in one call (equal to the step-wise
    # decode), weights recomputed exactly from the log-sum-exp
    n = int(eval_len[0])
    src0, out0 = eval_src[:1, :n], pred[:1, :n]
    with torch.no_grad():
        _, weights = model(src0, eval_len[:1], out0, return_weights=True)
    source, target = eval_pairs[0][0], decode(out0[0].tolist())
    from .viz import plot_alignment

    k = min(cfg.plot_chars, n)
    plots = []
    try:
        plots.append(plot_alignment(weights[0, 0, :k, :k], source[:k], target[:k],
                                    os.path.join(out_dir, "alignment.png"),
                                    title=f"reverse each word: first {k} of {n} characters"))
        plots.append(plot_alignment(weights[0, 0], source, target,
                                    os.path.join(out_dir, "alignment_full.png"),
                                    title=f"reverse each word: all {n} characters"))
    except ImportError as e:  # matplotlib is optional: train and report anyway
        print(f"no alignment plot: {e}", file=sys.stderr)

    memory = None
    if measure:
        names = ["reference"] + [b for b in ("cpu",) if available_backends().get(b) is None]
        memory = measure_memory(model, *first_batch, cfg, names)

    summary = {
        "task": "reverse each word (character level)",
        "accuracy": round(accuracy, 4),
        "accuracy_metric": "held-out character accuracy, greedy decoding, exactly len(source) steps",
        "teacher_forced_accuracy": round(tf_accuracy, 4),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "backend": used,
        "backend_requested": backend,
        "available_backends": available_backends(),
        "threads": torch.get_num_threads(),
        "final_loss": round(loss_avg, 4),
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "example": {"source": source, "target": eval_pairs[0][1], "output": target},
        "plots": [os.path.basename(p) for p in plots],
        "memory": memory,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if memory is not None:
        for name in memory:
            if isinstance(memory[name], dict) and "peak_rss_growth_mb" in memory[name]:
                m = memory[name]
                print(f"attention fwd+bwd on one batch, backend {name}: peak RSS growth "
                      f"{m['peak_rss_growth_mb']} MB, {m['seconds']}s", file=sys.stderr)
    print(f"wrote {', '.join(os.path.join(out_dir, f) for f in [*summary['plots'], 'summary.json'])}",
          file=sys.stderr)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedattn.demo", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="< 3 minutes on 2 cores (lines of 90-120 chars)")
    size.add_argument("--smoke", action="store_true", help="seconds; for tests (accuracy meaningless)")
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--backend", default="auto", help="attention backend (default: auto)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(_measure_child(args._measure, args.backend)))
        return 0
    cfg = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.steps is not None:
        cfg = Config(**{**asdict(cfg), "steps": args.steps})
    run(cfg, args.out, backend=args.backend, threads=args.threads, measure=not args.no_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
