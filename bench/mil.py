"""Bench: ABMIL training speed and memory on slide-sized bags, and the vectorised bootstrap of AUC.

Prints, in one run:
  - ABMIL training throughput (slides/s) on synthetic bags (default 200 slides x 2,000 tiles x 1,024-d, float16 as
    extract writes them): one slide per step (the paper's protocol, the baseline) vs the padded mini-batch mode;
  - one 100,000-tile bag trained for a few steps in a fresh process: time per step and the memory training adds
    on top of the resident bag (peak RSS), against the bag's own float32 size as the baseline (target: it trains,
    with a small multiple of the bag);
  - 1,000 bootstrap resamples of AUC over 10,000 predictions: gpfm.arena.metrics vs a plain loop of sklearn's
    roc_auc_score over the same resamples (target >= 10x), with the largest difference between the two.
Writes bench/results/mil.json. Options: --device cuda, --slides/--tiles/--dim for other sizes, --threads (default 1:
on 2 shared cores a second intra-op thread makes these small GEMMs several times slower).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gpfm.arena import metrics as M
from gpfm.arena.mil import build_mil
from gpfm.arena.train import MILSettings, train_mil

RESULTS = Path(__file__).resolve().parent / "results" / "mil.json"


def peak_mb(device: str) -> float:
    """Peak memory so far: CUDA allocator peak, or this process's RSS high-water mark (VmHWM)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        except OSError:
            pass


def throughput(bags: list[np.ndarray], y: torch.Tensor, batch_size: int, device: str) -> float:
    """Slides per second over one training epoch (after a 4-slide warm-up)."""
    torch.manual_seed(0)
    model = build_mil("abmil", bags[0].shape[1], 2)
    warm = MILSettings(epochs=1, batch_size=batch_size, balanced_sampling=False)
    train_mil(model, bags[:4], y[:4], F.cross_entropy, warm, 0, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_mil(model, bags, y, F.cross_entropy, MILSettings(epochs=1, batch_size=batch_size), 0, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(bags) / (time.perf_counter() - t0)


def _big_bag(n_tiles: int, dim: int, steps: int, device: str, threads: int, out: mp.Queue) -> None:
    torch.set_num_threads(threads)
    bag = np.random.default_rng(0).standard_normal((n_tiles, dim), dtype=np.float32).astype(np.float16)
    model = build_mil("abmil", dim, 2)
    settings = MILSettings(epochs=1, balanced_sampling=False)
    train_mil(model, bag[None, :64], torch.tensor([1]), F.cross_entropy, settings, 0, device)  # warm-up
    reset_peak(device)
    base = peak_mb(device)
    t0 = time.perf_counter()
    train_mil(model, [bag] * steps, torch.tensor([1] * steps), F.cross_entropy, settings, 0, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out.put({"seconds_per_step": (time.perf_counter() - t0) / steps, "peak_mb": peak_mb(device),
             "start_mb": base, "bag_fp32_mb": n_tiles * dim * 4 / 2**20})


def big_bag(n_tiles: int, dim: int, steps: int, device: str, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_big_bag, args=(n_tiles, dim, steps, device, threads, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"error": f"process exited with {p.exitcode} (out of memory?)"}
    return q.get()


def bootstrap_speed(n: int = 10_000, n_boot: int = 1000) -> dict:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.4 * y, 3)  # with ties
    df = pd.DataFrame({"label": y, "pred": (s > 0.7).astype(int), "prob_0": 1 - s, "prob_1": s})
    idx = M.bootstrap_indices(n, n_boot, seed=0)
    t0 = time.perf_counter()
    fast = M.metric_on_resamples("auc", df, idx)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = np.array([roc_auc_score(y[i], s[i]) for i in idx])
    t_loop = time.perf_counter() - t0
    return {"vectorised_s": t_fast, "loop_s": t_loop, "speedup": t_loop / t_fast,
            "max_abs_diff": float(np.abs(fast - slow).max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--big-tiles", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((a.tiles, a.dim), dtype=np.float32).astype(np.float16) for _ in range(a.slides)]
    y = torch.tensor(rng.integers(0, 2, a.slides))
    one = throughput(bags, y, 1, a.device)
    batched = throughput(bags, y, a.batch_size, a.device)
    peak = peak_mb(a.device)
    del bags
    big = big_bag(a.big_tiles, a.dim, 3, a.device, a.threads)
    boot = bootstrap_speed()
    res = {"device": a.device, "threads": a.threads, "slides": a.slides, "tiles": a.tiles, "dim": a.dim,
           "slides_per_s_batch1": one, f"slides_per_s_batch{a.batch_size}": batched,
           "batched_speedup": batched / one, "peak_mb_throughput_run": peak, "big_bag": big, "bootstrap": boot}
    print(f"ABMIL training, {a.slides} slides x {a.tiles} tiles x {a.dim}-d ({a.device}, {a.threads} threads)")
    print(f"  {'mode':34s} {'slides/s':>10s} {'ratio':>8s}")
    print(f"  {'1 slide per step (paper, baseline)':34s} {one:10.2f} {1.0:8.2f}")
    print(f"  {f'padded mini-batch of {a.batch_size}':34s} {batched:10.2f} {batched / one:8.2f}")
    print(f"  peak memory of the process (bags included): {peak:.0f} MB")
    if "error" in big:
        print(f"{a.big_tiles:,}-tile bag: FAILED: {big['error']}")
    else:
        ratio = (big["peak_mb"] - big["start_mb"]) / big["bag_fp32_mb"]
        res["big_bag"]["peak_over_bag"] = ratio
        print(f"one {a.big_tiles:,}-tile bag: {big['seconds_per_step']:.2f} s/step; training adds "
              f"{big['peak_mb'] - big['start_mb']:.0f} MB to {big['start_mb']:.0f} MB resident = {ratio:.1f}x the "
              f"bag's float32 size ({big['bag_fp32_mb']:.0f} MB, the baseline)")
    print(f"bootstrap AUC, 1,000 x 10,000: vectorised {boot['vectorised_s'] * 1e3:.0f} ms, sklearn loop "
          f"{boot['loop_s']:.2f} s -> {boot['speedup']:.1f}x (target >= 10x), max |diff| {boot['max_abs_diff']:.1e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if boot["speedup"] >= 10 and "error" not in big else 1


if __name__ == "__main__":
    sys.exit(main())
