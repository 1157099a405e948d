"""Bench: ROI kNN (100,000 x 1,024 database, 10,000 queries) against scikit-learn's brute-force search, and the
linear-probe epoch time on 100,000 samples against a textbook autograd loop. Both baselines run in the same
process on the same data. Writes bench/results/roi.json.

    .venv/bin/python bench/roi.py            # full size (2-4 min on 2 cores, the two sklearn searches dominate)
    .venv/bin/python bench/roi.py --small    # 10x smaller, for a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gpfm.arena import retrieval, roi


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms from /proc/self/statm (MiB)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn):
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t
    return out, sec, mem.mib


def bench_knn(n_db: int, n_q: int, dim: int, n_classes: int, rng: np.random.Generator) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    db = rng.standard_normal((n_db, dim), dtype=np.float32)
    q = rng.standard_normal((n_q, dim), dtype=np.float32)
    y = rng.integers(0, n_classes, n_db)
    retrieval.knn_probs(db[:2000], y[:2000], q[:200], n_classes)  # warm-up (first-call set-up costs)
    ours, t_ours, m_ours = timed(lambda: retrieval.knn_probs(db, y, q, n_classes, ks=(1, 20)))
    rows = {"gpfm knn (k=1,20, probs)": (t_ours, m_ours)}
    # scikit-learn, neighbour search only (its fastest path: the Euclidean ArgKmin on pre-normalised features,
    # which ranks like cosine), and the cosine metric the protocol names
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sk_e = KNeighborsClassifier(20, algorithm="brute", metric="euclidean").fit(dbn, y)
    (_, idx_e), t_e, m_e = timed(lambda: sk_e.kneighbors(qn))
    rows["sklearn brute euclidean (normalised)"] = (t_e, m_e)
    sk_c = KNeighborsClassifier(20, algorithm="brute", metric="cosine").fit(db, y)
    _, t_c, m_c = timed(lambda: sk_c.kneighbors(q, return_distance=False))
    rows["sklearn brute cosine"] = (t_c, m_c)
    k1_same = float((ours[1].argmax(1) == y[idx_e[:, 0]]).mean())
    return {"rows": rows, "speedup_vs_fastest_sklearn": min(t_e, t_c) / t_ours, "k1_agreement": k1_same,
            "db_mib": db.nbytes / 2**20}


def bench_linear(n: int, dim: int, n_classes: int, epochs: int, rng: np.random.Generator) -> dict:
    centers = rng.standard_normal((n_classes, dim), dtype=np.float32)
    y = rng.integers(0, n_classes, n)
    x = centers[y] + 3 * rng.standard_normal((n, dim), dtype=np.float32)
    xv, yv = x[:2000], y[:2000]
    roi.train_linear_probe(xv, yv, xv, yv, n_classes, max_epochs=1)  # warm-up (first-call set-up costs)
    _, t_ours, _ = timed(lambda: roi.train_linear_probe(x, y, xv, yv, n_classes, max_epochs=epochs,
                                                        patience=10**6))

    def textbook(x=x, y=y, epochs=epochs):
        n = len(x)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        xvt = torch.from_numpy(xv)
        model = torch.nn.Linear(dim, n_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-5)
        steps = epochs * math.ceil(n / 256)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(epochs):
            for idx in torch.randperm(n).split(256):
                loss = loss_fn(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                roi.val_score(yv, torch.softmax(model(xvt), 1).numpy())

    with roi.one_thread(torch.device("cpu")):  # the same single intra-op thread as ours: a fair comparison
        textbook(xv, yv, 1)
        _, t_base, _ = timed(textbook)
    return {"epoch_s": t_ours / epochs, "baseline_epoch_s": t_base / epochs, "speedup": t_base / t_ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="10x smaller database and probe set")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rng = np.random.default_rng(0)
    scale = 10 if args.small else 1
    n_db, n_q, dim = 100_000 // scale, 10_000 // scale, 1024
    knn = bench_knn(n_db, n_q, dim, 10, rng)
    lin = bench_linear(100_000 // scale, dim, 10, 3, rng)

    print(f"\nkNN: database {n_db:,} x {dim}, {n_q:,} queries ({knn['db_mib']:.0f} MiB database), "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'method':40s} {'seconds':>9s} {'peak extra MiB':>15s}")
    for name, (sec, mib) in knn["rows"].items():
        print(f"{name:40s} {sec:9.2f} {mib:15.0f}")
    print(f"speed-up vs the fastest scikit-learn search: {knn['speedup_vs_fastest_sklearn']:.2f}x (target >= 2x); "
          f"k=1 predictions agree with sklearn on {100 * knn['k1_agreement']:.2f} % of queries")
    print(f"\nlinear probe, {100_000 // scale:,} x {dim}, 10 classes, batch 256 (per epoch incl. validation AUC)")
    print(f"{'gpfm closed-form gradients (1 thread)':40s} {lin['epoch_s']:9.3f} s")
    print(f"{'torch autograd nn.Linear + AdamW (1 thr)':40s} {lin['baseline_epoch_s']:9.3f} s")
    print(f"speed-up: {lin['speedup']:.2f}x")
    out = Path(__file__).resolve().parent / "results" / "roi.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"knn": {**knn, "rows": {k: {"seconds": s, "peak_extra_mib": m} for k, (s, m) in knn["rows"].items()},
                      "n_db": n_db, "n_queries": n_q, "dim": dim},
              "linear_probe": {**lin, "n": 100_000 // scale, "dim": dim}, "small": args.small}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
