"""Image retrieval on frozen features (GPFM-METHOD.md §5.2), and the chunked nearest-neighbour search it shares
with the ROI kNN probe (DINOv2 weighted vote, `knn_probs`).

Protocol: the database is the training part of the split (train + val: retrieval tunes nothing), the queries are
the test part. Features are z-scored with the database's mean and std, compared by Euclidean distance, and the
`k_vote` nearest database images (default: the number of classes, as upstream) vote for their class with weight
`max(1.0 - 0.1 i, 0)` for neighbour i = 0, 1, ...; the class scores go through a softmax and Acc@k asks whether
the query's class is among the k best-scored classes. Upstream's weights go negative from the 12th neighbour on
(tasks with more than 11 classes), which makes far neighbours vote *against* their class; we clamp them at 0
(requirement R10), which changes nothing for up to 11 classes. Ties between class scores give the
query's average over random tie orders (a true class tied with 2 others for the last place scores 1/3), so
chance level is exactly k / C and no class wins ties by its index.

Per-query columns in predictions.csv: `label`, `pred` (best-scored class), `hit@1`, `hit@3`, `hit@5`, `mv@5`
(majority vote of the 5 nearest images, ties to the nearer one), `ap@R` (average precision over the R nearest
images, R = number of database images of the query's class) and `nearest` (sample id of the nearest image).
Metrics: `acc@1`, `acc@3`, `acc@5` and `mmv@5` are macro-averaged over classes (upstream's torchmetrics
`average='macro'`), `map@r` is the mean over queries (Musgrave et al. 2020); all with bootstrap CIs.

Settings (`settings:` in the spec): `k_vote` (int, default = number of classes), `ks` ([1, 3, 5]),
`mv_k` (5), `decay` (0.1), `chunk_elements` (2**25: distance-matrix elements held at once, bounds memory),
`n_boot` (1000).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpfm.arena import metrics as M
from gpfm.arena.runner import FoldResult, TaskData
from gpfm.arena.splits import Split
from gpfm.arena.tasks import TaskSpec
from gpfm.config import from_dict
from gpfm.io import GpfmError

DEFAULT_CHUNK = 1 << 25  # 32 M distance entries (128 MB float32) per block
_METRICS: dict = {}


@dataclass
class ImageSetSettings:
    """Settings shared by ROI classification and retrieval (how the image set is read and scored)."""

    label_column: str = "label"  # column of the labels CSV holding the class (e.g. "grade" for another task)
    n_boot: int = 1000  # bootstrap resamples of the test predictions
    chunk_elements: int = DEFAULT_CHUNK  # similarity-matrix entries held at once (bounds kNN/retrieval memory)


# ------------------------------------------------------------------------------------------- nearest neighbours
def zscore(reference: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """Standardise `reference` and `others` with the reference's per-feature mean and std (std floored at eps)."""
    ref = np.asarray(reference, dtype=np.float32)
    mean = ref.mean(0, keepdims=True)
    std = np.maximum(ref.std(0, keepdims=True), eps)
    return [(np.asarray(a, dtype=np.float32) - mean) / std for a in (ref, *others)]


def iter_topk(queries: np.ndarray | torch.Tensor, database: np.ndarray | torch.Tensor, k: int,
              metric: str = "euclidean", chunk_elements: int = DEFAULT_CHUNK,
              device: str | torch.device | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (first query row, scores (q, k), indices (q, k)) for blocks of queries, nearest first.

    `metric="cosine"`: scores are cosine similarities (descending). `"euclidean"`: scores are distances
    (ascending). Only one (block x database) matrix exists at a time, its size capped by `chunk_elements`, so
    memory stays bounded whatever the database size.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', not {metric!r}")
    db = torch.as_tensor(database, dtype=torch.float32, device=device)
    q_all = torch.as_tensor(queries, dtype=torch.float32, device=device)
    if db.ndim != 2 or q_all.ndim != 2 or db.shape[1] != q_all.shape[1]:
        raise ValueError(f"queries {tuple(q_all.shape)} and database {tuple(db.shape)} must be (n, d) alike")
    k = min(int(k), db.shape[0])
    if metric == "cosine":  # scale columns by 1/|d| instead of copying a normalised database
        column = 1.0 / torch.linalg.vector_norm(db, dim=1).clamp_min(1e-12)
    else:
        column = -(db * db).sum(1)  # -|d|^2: score 2 q.d - |d|^2 ranks like -|q - d|^2
    rows = max(1, chunk_elements // max(1, db.shape[0] + k))
    for start in range(0, q_all.shape[0], rows):
        q = q_all[start:start + rows]
        if metric == "cosine":
            sim = (torch.nn.functional.normalize(q, dim=1) @ db.T).mul_(column)
            vals, idx = torch.topk(sim, k, dim=1)
        else:
            sim = torch.addmm(column, q, db.T, beta=1.0, alpha=2.0)
            vals, idx = torch.topk(sim, k, dim=1)
            vals = ((q * q).sum(1, keepdim=True) - vals).clamp_min_(0).sqrt_()
        del sim
        yield start, vals, idx


def topk(queries: np.ndarray, database: np.ndarray, k: int, metric: str = "euclidean",
         chunk_elements: int = DEFAULT_CHUNK, device: str | torch.device | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """All of `iter_topk` at once: (scores (Q, k), indices (Q, k)) as numpy arrays, nearest first."""
    parts = [(v.cpu(), i.cpu()) for _, v, i in iter_topk(queries, database, k, metric, chunk_elements, device)]
    if not parts:
        k = min(int(k), len(database))
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy()


def knn_probs(x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, n_classes: int,
              ks: list[int] | tuple[int, ...] = (1, 20), temperature: float = 0.07,
              chunk_elements: int = DEFAULT_CHUNK, device: str | torch.device | None = None
              ) -> dict[int, np.ndarray]:
    """DINOv2 weighted kNN: {k: class probabilities (n_query, C)} from softmax(cosine / T) over the k nearest."""
    y = torch.as_tensor(np.asarray(y_train, np.int64))
    kmax = max(ks)
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for _, sims, idx in iter_topk(x_query, x_train, kmax, "cosine", chunk_elements, device):
        sims, labels = sims.cpu(), y[idx.cpu()]
        for k in ks:
            w = torch.softmax(sims[:, :k] / temperature, dim=1)
            probs = torch.zeros(len(w), n_classes, dtype=w.dtype).scatter_add_(1, labels[:, :k], w)
            out[k].append(probs.numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, n_classes)) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ scoring
def vote_weights(k: int, decay: float = 0.1) -> np.ndarray:
    """Neighbour i votes 1 - decay * i, clamped at 0 so that no neighbour votes against its class (R10)."""
    return np.clip(1.0 - decay * np.arange(k), 0.0, None)


def vote_probs(neighbor_labels: np.ndarray, n_classes: int, decay: float = 0.1) -> np.ndarray:
    """Class probabilities (Q, C): softmax over classes of the summed decaying votes of the ranked neighbours."""
    nl = np.asarray(neighbor_labels, dtype=np.int64)
    w = vote_weights(nl.shape[1], decay)
    scores = np.zeros((nl.shape[0], n_classes))
    np.add.at(scores, (np.repeat(np.arange(nl.shape[0]), nl.shape[1]), nl.ravel()), np.tile(w, nl.shape[0]))
    scores -= scores.max(1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(1, keepdims=True)


def topk_hits(probs: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] | list[int]) -> np.ndarray:
    """(Q, len(ks)) in [0, 1]: chance that the true class is among the k best-scored, ties broken at random.

    Without ties this is 0 or 1 (top-k accuracy); a true class tied with t - 1 others at the cut scores the
    fraction of tie orders that keep it in, so chance level is exactly k / C and no class wins ties by index.
    """
    probs = np.asarray(probs)
    true = probs[np.arange(len(probs)), labels][:, None]
    above = (probs > true).sum(1)[:, None]
    tied = (probs == true).sum(1)[:, None]  # includes the true class itself
    return np.clip((np.asarray(ks)[None, :] - above) / tied, 0.0, 1.0)


def majority_hits(neighbor_labels: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 5) -> np.ndarray:
    """(Q,) bool: does the majority class of the k nearest equal the label? A tie goes to the nearest tied class."""
    nl = np.asarray(neighbor_labels)[:, :k]
    counts = np.zeros((len(nl), n_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(nl)), nl.shape[1]), nl.ravel()), 1)
    top = counts.max(1, keepdims=True)
    tied = counts[np.arange(len(nl))[:, None], nl] == top  # (Q, k): neighbour belongs to a top-count class
    winner = nl[np.arange(len(nl)), tied.argmax(1)]
    return winner == labels


def average_precision_at_r(neighbor_labels: np.ndarray, labels: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R per query: mean over the first R ranks of precision@i at relevant ranks i (R = relevant count)."""
    nl = np.asarray(neighbor_labels)
    rel = nl == np.asarray(labels)[:, None]
    ranks = np.arange(1, nl.shape[1] + 1)
    within = ranks[None, :] <= np.asarray(r)[:, None]
    prec = np.cumsum(rel, 1) / ranks[None, :]
    return np.where(r > 0, (prec * rel * within).sum(1) / np.maximum(r, 1), 0.0)


def retrieve(db_x: np.ndarray, db_y: np.ndarray, q_x: np.ndarray, q_y: np.ndarray, n_classes: int,
             k_vote: int | None = None, ks: tuple[int, ...] = (1, 3, 5), mv_k: int = 5, decay: float = 0.1,
             chunk_elements: int = DEFAULT_CHUNK, device: str | torch.device | None = None) -> pd.DataFrame:
    """Run the retrieval protocol; one row per query with `label`, `pred`, `hit@k`, `mv@k`, `ap@R`, `nearest_index`.

    Features are z-scored with the database's statistics here; labels are ints in [0, n_classes).
    """
    db_y = np.asarray(db_y, dtype=np.int64)
    q_y = np.asarray(q_y, dtype=np.int64)
    if len(db_y) == 0 or len(q_y) == 0:
        raise GpfmError(f"retrieval needs a database and queries (have {len(db_y)} and {len(q_y)} images)")
    k_vote = n_classes if k_vote is None else int(k_vote)
    db_z, q_z = zscore(db_x, q_x)
    class_count = np.bincount(db_y, minlength=n_classes)
    r = class_count[q_y]
    k = min(len(db_y), max(k_vote, mv_k, int(r.max())))
    db_y_t = torch.as_tensor(db_y)
    cols: dict[str, list[np.ndarray]] = {"pred": [], "hits": [], "mv": [], "ap": [], "nearest": []}
    for start, _, idx in iter_topk(q_z, db_z, k, "euclidean", chunk_elements, device):
        nl = db_y_t[idx.cpu()].numpy()
        y = q_y[start:start + len(nl)]
        probs = vote_probs(nl[:, :k_vote], n_classes, decay)
        cols["pred"].append(probs.argmax(1))
        cols["hits"].append(topk_hits(probs, y, ks))
        cols["mv"].append(majority_hits(nl, y, n_classes, mv_k))
        cols["ap"].append(average_precision_at_r(nl, y, r[start:start + len(nl)]))
        cols["nearest"].append(idx[:, 0].cpu().numpy())
    hits = np.concatenate(cols["hits"])
    out = {"label": q_y, "pred": np.concatenate(cols["pred"])}
    out.update({f"hit@{kk}": hits[:, j] for j, kk in enumerate(ks)})
    out[f"mv@{mv_k}"] = np.concatenate(cols["mv"]).astype(int)
    out["ap@R"] = np.concatenate(cols["ap"])
    out["nearest_index"] = np.concatenate(cols["nearest"])
    return pd.DataFrame(out)


def macro_mean(df: pd.DataFrame, column: str) -> float:
    """Mean of a per-query 0/1 column within each true class, then over classes (macro average)."""
    return float(df.groupby("label")[column].mean().mean())


# ------------------------------------------------------------------------------------- metrics and handler
def _macro_batch(column: str):
    """Batch fn: per-class weighted mean of a per-query column, averaged over the classes present."""
    def batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
        y = df["label"].to_numpy(int)
        onehot = np.eye(int(y.max(initial=0)) + 1)[y]
        tot = counts @ onehot
        hit = counts @ (onehot * df[column].to_numpy(float)[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(tot > 0, hit / np.where(tot > 0, tot, 1), np.nan), axis=1)
    return batch


def _mean_batch(column: str):
    def batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
        return counts @ df[column].to_numpy(float) / counts.sum(1)
    return batch


def _register(name: str, batch) -> str:
    if name not in _METRICS:
        def fn(df: pd.DataFrame) -> float:
            return float(batch(df, np.ones((1, len(df))))[0])
        _METRICS[name] = fn
        M.register_metric(name, fn, True, batch)
    return name


def metric_names(ks: list[int] | tuple[int, ...], mv_k: int) -> list[str]:
    """Register (once) and list the retrieval metrics: acc@k (macro), mmv@k (macro), map@r (mean)."""
    names = [_register(f"acc@{k}", _macro_batch(f"hit@{k}")) for k in ks]
    names.append(_register(f"mmv@{mv_k}", _macro_batch(f"mv@{mv_k}")))
    names.append(_register("map@r", _mean_batch("ap@R")))
    return names


@dataclass
class RetrievalSettings(ImageSetSettings):
    """`settings:` of a retrieval task (see the module docstring)."""

    k_vote: int | None = None
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    mv_k: int = 5
    decay: float = 0.1


def validate(task: TaskSpec) -> RetrievalSettings:
    s = from_dict(RetrievalSettings, task.settings, "settings")
    if not s.ks or min(s.ks) < 1 or s.mv_k < 1 or (s.k_vote is not None and s.k_vote < 1) or s.decay < 0:
        raise GpfmError(f"{task.source or task.name}: settings ks, mv_k and k_vote must be positive integers "
                        "and decay >= 0")
    metric_names(s.ks, s.mv_k)
    return s


def load(task: TaskSpec, features_dir: Path, external_dir: Path | None = None) -> TaskData:
    """The image set, exactly as ROI classification reads it (gpfm.arena.roi.load)."""
    from gpfm.arena import roi

    return roi.load(task, features_dir, external_dir)


def make_folds(task: TaskSpec, data: TaskData, seed: int) -> list[Split]:
    from gpfm.arena import roi

    return roi.make_folds(task, data, seed)


def run_fold(task: TaskSpec, data: TaskData, split: Split, seed: int, device: str) -> FoldResult:
    """Database = train + val, queries = test; one predictions row per query."""
    from gpfm.arena import roi

    s = validate(task)
    arr = roi.fold_arrays(data, split)
    db_x = np.concatenate([arr["train"][0], arr["val"][0]])
    db_y = np.concatenate([arr["train"][1], arr["val"][1]])
    db_ids = np.concatenate([arr["train"][2]["sample_id"].to_numpy(), arr["val"][2]["sample_id"].to_numpy()])
    q_x, q_y, test = arr["test"]
    res = retrieve(db_x, db_y, q_x, q_y, len(data.info["classes"]), s.k_vote, tuple(s.ks), s.mv_k, s.decay,
                   s.chunk_elements, device)
    res.insert(0, "sample_id", test["sample_id"].to_numpy())
    res.insert(1, "case_id", test["case_id"].to_numpy())
    res["nearest"] = db_ids[res.pop("nearest_index").to_numpy()]
    seed_f = roi.fold_seed(seed, split.fold)
    metrics = M.bootstrap_all(metric_names(s.ks, s.mv_k), res, s.n_boot, seed_f)
    info = {"classes": data.info["classes"], "n_database": len(db_y), "n_queries": len(q_y),
            "k_vote": s.k_vote or len(data.info["classes"])}
    return FoldResult(res, metrics, info)


metric_names((1, 3, 5), 5)
