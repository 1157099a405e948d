"""Few-shot ROI classification: SimpleShot-style prototypes over many seeded episodes (beyond the GPFM paper).

An episode draws `shot` training images per class (without replacement, seeded). Features are centred with the
episode's support mean (the only statistics a k-shot user has) and L2-normalised; each class prototype is the
mean of its normalised support features, and a test image goes to the nearest prototype (Euclidean). The whole
test set is scored in every episode; balanced accuracy, macro F1 and macro AUC (scores = minus the distance) are
reported as the mean over episodes with a 95 % Student-t confidence interval of that mean, which narrows as
episodes are added. Episodes are scored in blocks by matrix products, so no per-episode copy of the test
features is ever made.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from gpfm.arena import metrics as M
from gpfm.io import GpfmError

FEWSHOT_METRICS = ("balanced_accuracy", "macro_f1", "auc")


def sample_episodes(y_train: np.ndarray, n_classes: int, shot: int, n_episodes: int, seed: int = 0,
                    class_names: list[str] | None = None) -> np.ndarray:
    """(n_episodes, n_classes, shot) training-row indices; error naming any class with fewer than `shot` images."""
    y = np.asarray(y_train, np.int64)
    by_class = [np.flatnonzero(y == c) for c in range(n_classes)]
    for c, rows in enumerate(by_class):
        if len(rows) < shot:
            name = class_names[c] if class_names else str(c)
            raise GpfmError(f"few-shot {shot}-shot: class '{name}' has only {len(rows)} training images; "
                            "lower settings.fewshot_shots or add images of that class")
    rng = np.random.default_rng([int(seed), int(shot)])
    out = np.empty((n_episodes, n_classes, shot), np.int64)
    for e in range(n_episodes):
        for c, rows in enumerate(by_class):
            out[e, c] = rng.choice(rows, size=shot, replace=False)
    return out


def prototype_scores(x_train: np.ndarray, x_test: np.ndarray, episodes: np.ndarray,
                     block: int = 64) -> np.ndarray:
    """(n_episodes, n_test, C) minus squared distances of centred, normalised test features to each prototype.

    With support mean mu and prototype p_c, ||q^ - p_c||^2 = 1 - 2 q^.p_c + ||p_c||^2 where
    q^.p_c = (q.p_c - mu.p_c) / ||q - mu||, and ||q - mu||^2 = ||q||^2 - 2 q.mu + ||mu||^2: a few matrix
    products per block of episodes, never a centred copy of the test set.
    """
    xtr = np.asarray(x_train, np.float32)
    q = np.asarray(x_test, np.float32)
    q_sq = (q * q).sum(1)
    n_ep, n_cls, _ = episodes.shape
    out = np.empty((n_ep, len(q), n_cls), np.float32)
    for s in range(0, n_ep, block):
        sup = xtr[episodes[s:s + block]]  # (e, C, shot, d)
        mu = sup.mean(axis=(1, 2))  # (e, d)
        cen = sup - mu[:, None, None, :]
        cen /= np.maximum(np.linalg.norm(cen, axis=-1, keepdims=True), 1e-12)
        proto = cen.mean(2)  # (e, C, d)
        e = len(proto)
        qp = (q @ proto.reshape(e * n_cls, -1).T).reshape(len(q), e, n_cls)  # q.p_c
        qm = q @ mu.T  # (n, e)
        norm = np.sqrt(np.maximum(q_sq[:, None] - 2 * qm + (mu * mu).sum(1)[None, :], 1e-24))
        mp = np.einsum("ed,ecd->ec", mu, proto)  # mu.p_c
        dot = (qp - mp[None]) / norm[:, :, None]
        out[s:s + e] = np.transpose(2 * dot - (proto * proto).sum(-1)[None] - 1.0, (1, 0, 2))
    return out


def mean_ci(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """{value, mean, std, ci_low, ci_high}: mean over episodes and the Student-t CI of that mean."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        nan = float("nan")
        return {"value": nan, "mean": nan, "std": nan, "ci_low": nan, "ci_high": nan}
    m = float(v.mean())
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sd / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"value": m, "mean": m, "std": sd, "ci_low": m - half, "ci_high": m + half}


def episode_metrics(scores: np.ndarray, y_test: np.ndarray) -> dict[str, np.ndarray]:
    """Per-episode {metric: (n_episodes,)} from prototype scores (n_episodes, n_test, C)."""
    y = np.asarray(y_test, np.int64)
    out: dict[str, list[float]] = {m: [] for m in FEWSHOT_METRICS}
    for s in scores:
        df = pd.DataFrame(_softmax(s), columns=[f"prob_{c}" for c in range(s.shape[1])])
        df["label"], df["pred"] = y, s.argmax(1)
        for m in FEWSHOT_METRICS:
            out[m].append(float(M.get_metric(m).fn(df)))
    return {m: np.asarray(v) for m, v in out.items()}


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fewshot_eval(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 n_classes: int, shots: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16), n_episodes: int = 100,
                 seed: int = 0, class_names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """{f"fewshot{k}_{metric}": mean_ci(...)} for every shot count k; episodes are seeded by (seed, k)."""
    out = {}
    for shot in shots:
        eps = sample_episodes(y_train, n_classes, int(shot), n_episodes, seed, class_names)
        per_ep = episode_metrics(prototype_scores(x_train, x_test, eps), y_test)
        for m, vals in per_ep.items():
            out[f"fewshot{shot}_{m}"] = mean_ci(vals)
    return out
