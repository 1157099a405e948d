"""Fixtures for the arena tests: synthetic slide-level cohorts with a planted MIL signal (written like extract does).

A positive slide (or a high-risk patient) carries a few tiles shifted along a hidden direction; the rest of every
bag is noise. Tiny MIL heads train fast with one torch thread (2 threads on 2 busy cores is many times slower).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpfm.io import write_h5


@pytest.fixture
def one_thread():
    """Use in a module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_bag(path: Path, x: np.ndarray) -> None:
    write_h5(path, {"features": x, "coords": np.zeros((len(x), 2), np.int64)},
             {"features": {"encoder": path.parent.name, "dim": x.shape[1]}})


def make_slide_cohort(root: Path, n_cases: int = 80, dim: int = 16, seed: int = 0, encoders=("enc_a",),
                      n_classes: int = 2, shift: float = 3.0, multi_slide_every: int = 4) -> dict:
    """Write features/<enc>/<slide>.h5 plus labels cls.csv and surv.csv; return paths and hidden truth.

    Classification: class k > 0 slides carry 3 tiles shifted along direction k. Survival: each patient's risk
    r ~ U(0, 1) shifts every tile by shift * r along direction 0 and time = 10 exp(-3 r) Weibull(2.5), censored uniformly
    on [0, 8] (~30 % censored; the oracle C-index of r is about 0.86).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(max(n_classes, 2), dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cls_rows, surv_rows, risks = [], [], {}
    for c in range(n_cases):
        case = f"P{c:03d}"
        label = c % n_classes
        risk = float(rng.random())
        t_event = 10 * np.exp(-3 * risk) * rng.weibull(2.5)
        t_cens = rng.uniform(0, 8)  # administrative censoring: the longest follow-ups are mostly censored
        time, event = (t_event, 1) if t_event <= t_cens else (t_cens, 0)
        risks[case] = risk
        for s in range(1 + (multi_slide_every > 0 and c % multi_slide_every == 0)):
            sid = f"{case}-S{s}"
            cls_rows.append({"slide_id": sid, "case_id": case, "label": f"class{label}"})
            surv_rows.append({"slide_id": sid, "case_id": case, "time": round(time, 3), "event": event})
            for enc in encoders:
                n = int(rng.integers(16, 40))
                x = rng.normal(size=(n, dim)).astype(np.float32)
                if label > 0:
                    x[:3] += shift * dirs[label]
                x += shift * risk * dirs[0]  # every tile carries the patient's risk
                write_bag(root / "features" / enc / f"{sid}.h5", x.astype(np.float16))
    pd.DataFrame(cls_rows).to_csv(root / "cls.csv", index=False)
    pd.DataFrame(surv_rows).to_csv(root / "surv.csv", index=False)
    return {"root": root, "features": root / "features", "cls": root / "cls.csv", "surv": root / "surv.csv",
            "risk": risks, "dim": dim}


@pytest.fixture
def slide_cohort(tmp_path):
    """A factory: slide_cohort(**kw) -> make_slide_cohort(tmp_path / 'cohort', **kw)."""
    return lambda **kw: make_slide_cohort(tmp_path / "cohort", **kw)
