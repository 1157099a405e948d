"""Bench: report-generation training step time and decoding throughput, greedy vs beam search, in one run.

Synthetic slides (default 64 bags x 256 tiles x 512-d) with 24-token reports whose words are decided by hidden
variables in the tiles; the default report model (gpfm.arena.decoder: d_model 256, 3 layers, 32 pooled memory
tokens). Prints, with the same model and batch:
  - the training step time (batch 16, teacher forcing, AdamW) and slides/s;
  - decoding throughput (reports/s) of greedy decoding (the baseline) and beam search (beam 3, length penalty 0.6),
    and their ratio;
  - greedy decoding that re-runs the decoder over the whole prefix at every step (no key/value cache), against the
    cached greedy decoder, to show what the cache buys.
The model is trained for --train-steps first so decoded reports have realistic lengths. Writes
bench/results/report_gen.json. Options: --device cuda, --threads (default 1: on 2 shared cores a second intra-op
thread slows these small GEMMs down), sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpfm.arena.decoder import DecoderConfig
from gpfm.arena.gen_common import pad_bags
from gpfm.arena.report_gen import ReportModel
from gpfm.arena.text import BOS, EOS, PAD, Vocab, encode_batch

RESULTS = Path(__file__).resolve().parent / "results" / "report_gen.json"
WORDS = [["well", "moderately", "poorly"], ["clear", "involved", "close"], ["no", "nodal", "distant"],
         ["low", "intermediate", "high"], ["absent", "focal", "extensive"], ["small", "medium", "large"]]


def synthetic(n: int, tiles: int, dim: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Bags and 24-token reports: 6 hidden variables, one sentence each."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(WORDS), 3, dim)).astype(np.float32)
    bags, reports = [], []
    for _ in range(n):
        z = rng.integers(0, 3, len(WORDS))
        x = rng.normal(size=(tiles, dim)).astype(np.float32) * 0.5
        for v, val in enumerate(z):
            x[v * 10:(v + 1) * 10] += centers[v, val]
        bags.append(x)
        sent = [f"finding {v} {WORDS[v][z[v]]} ." for v in range(len(WORDS))]
        reports.append(" ".join(sent))
    return bags, reports


@torch.no_grad()
def greedy_no_cache(model: ReportModel, x: torch.Tensor, max_len: int) -> torch.Tensor:
    """Greedy decoding that runs the full decoder over the prefix at every step (the textbook loop)."""
    mem, mmask = model.memory(x, None)
    seqs = torch.full((x.size(0), 1), BOS, dtype=torch.long, device=x.device)
    done = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)
    for t in range(max_len + 1):
        logp = F.log_softmax(model.decoder(seqs, mem, mmask)[:, -1].float(), -1)
        logp[:, [PAD, BOS]] = -torch.inf
        tok = logp.argmax(-1) if t < max_len else torch.full_like(done, EOS, dtype=torch.long)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        seqs = torch.cat([seqs, tok[:, None]], 1)
        done |= tok == EOS
        if bool(done.all()):
            break
    return seqs[:, 1:]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--slides", type=int, default=64)
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--decode", type=int, default=32, help="reports decoded per method")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    bags, reports = synthetic(args.slides, args.tiles, args.dim)
    cfg = DecoderConfig(max_len=96)
    vocab = Vocab.build(reports, 1)
    ids = torch.from_numpy(encode_batch(vocab, reports, cfg.max_len)).to(dev)
    ids = ids[:, :int((ids != PAD).sum(1).max())]
    model = ReportModel(args.dim, len(vocab), cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    step_times = []
    for step in range(args.train_steps):
        pos = rng.choice(args.slides, args.batch, replace=False)
        x, mask = pad_bags([bags[i] for i in pos], device=dev)
        sync(dev)
        t0 = time.perf_counter()
        loss = model.loss(x, mask, ids[pos])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(dev)
        if step >= 3:
            step_times.append(time.perf_counter() - t0)
    model.eval()
    x, _ = pad_bags(bags[:args.decode], device=dev)
    res = {"device": dev, "threads": args.threads, "slides": args.slides, "tiles": args.tiles, "dim": args.dim,
           "batch": args.batch, "decoder": vars(cfg), "final_train_loss": float(loss.detach()),
           "train_step_s": float(np.median(step_times)), "train_slides_per_s": args.batch / float(np.median(step_times))}
    for name, fn in (("greedy", lambda: model.generate(x, None, beam=1)),
                     ("beam3", lambda: model.generate(x, None, beam=3, alpha=0.6)),
                     ("greedy_no_cache", lambda: greedy_no_cache(model, x, cfg.max_len))):
        fn() if name == "greedy" else None  # warm-up once
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        sec = time.perf_counter() - t0
        lengths = ((out != PAD) & (out != EOS)).sum(1).float().mean().item()
        res[name] = {"seconds": sec, "reports_per_s": args.decode / sec, "mean_tokens": lengths}
    g = res["greedy"]["reports_per_s"]
    print(f"report generation bench ({dev}, {args.threads} thread(s); {args.slides} slides x {args.tiles} tiles x "
          f"{args.dim}-d; d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.memory_tokens} memory tokens)")
    print(f"  train step (batch {args.batch}):   {res['train_step_s'] * 1e3:8.1f} ms   "
          f"{res['train_slides_per_s']:7.1f} slides/s   (loss {res['final_train_loss']:.3f})")
    print(f"  {'decoding':24s} {'reports/s':>10s} {'tokens':>8s} {'vs greedy':>10s}")
    for name in ("greedy", "beam3", "greedy_no_cache"):
        r = res[name]
        print(f"  {name:24s} {r['reports_per_s']:10.2f} {r['mean_tokens']:8.1f} {r['reports_per_s'] / g:9.2f}x")
    if abs(res["beam3"]["mean_tokens"] - res["greedy"]["mean_tokens"]) > 2:
        print("  note: greedy and beam reports differ in length (train longer, --train-steps) so reports/s differ "
              "by more than the search cost")
    res["beam3_vs_greedy"] = res["beam3"]["reports_per_s"] / g
    res["cache_speedup"] = g / res["greedy_no_cache"]["reports_per_s"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
