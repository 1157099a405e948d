"""`gpfm arena report`: a results folder written per the runner's layout becomes a correct leaderboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpfm.arena import metrics as M
from gpfm.arena.leaderboard import analyse, collect, write_report
from gpfm.cli import main
from gpfm.io import GpfmError

ENCODERS = {"strong": 0.5, "mid": 1.0, "weak": 2.5}  # noise level of each encoder's scores
TASKS = {"cls-a": "wsi_classification", "cls-b": "wsi_classification", "surv-a": "survival",
         "surv-b": "survival", "roi-a": "roi_classification", "roi-b": "roi_classification"}
METRIC = {"wsi_classification": "auc", "survival": "c_index", "roi_classification": "balanced_accuracy",
          "retrieval": "acc@1"}


def _predictions(category: str, noise: float, rng: np.random.Generator, n: int = 80) -> pd.DataFrame:
    ids = [f"s{i:03d}" for i in range(n)]
    if category == "survival":
        risk = rng.normal(size=n)
        time = np.exp(-risk + rng.normal(0, 0.5, n))
        return pd.DataFrame({"sample_id": ids, "case_id": ids, "time": time, "event": rng.integers(0, 2, n) | 1,
                             "risk": risk + rng.normal(0, noise, n)})
    y = np.arange(n) % 3
    if category == "retrieval":  # per-query hits, as gpfm.arena.retrieval writes them
        return pd.DataFrame({"sample_id": ids, "label": y, "hit@1": (rng.random(n) > noise / 3).astype(int)})
    logits = np.eye(3)[y] * 2 + rng.normal(0, noise, (n, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    df = pd.DataFrame({"sample_id": ids, "case_id": ids, "label": y, "pred": p.argmax(1)})
    for c in range(3):
        df[f"prob_{c}"] = p[:, c]
    return df


def make_run(root: Path, encoders=ENCODERS, tasks=TASKS, folds: int = 2, skip: tuple = ()) -> Path:
    """A results folder exactly as `gpfm arena run` lays it out (see gpfm.arena.runner)."""
    rng = np.random.default_rng(0)
    for task, cat in tasks.items():
        metric = METRIC[cat]
        for enc, noise in encoders.items():
            if (task, enc) in skip:
                continue
            vals = []
            for k in range(folds):
                pred = _predictions(cat, noise, np.random.default_rng([hash(task) % 1000, k, int(noise * 10)]))
                pred.insert(1, "fold", k)
                d = root / task / enc / f"fold_{k}"
                d.mkdir(parents=True)
                pred.to_csv(d / "predictions.csv", index=False)
                b = {"value": float(pred["hit@1"].mean()), "std": 0.0, "ci_low": 0.0, "ci_high": 1.0} \
                    if cat == "retrieval" else M.bootstrap(metric, pred, n_boot=50, seed=0)
                vals.append(b["value"])
                (d / "metrics.json").write_text(json.dumps({"task": task, "category": cat, "encoder": enc,
                                                            "fold": k, "primary_metric": metric,
                                                            "higher_is_better": True, "metrics": {metric: b}}))
            m = {"value": float(np.mean(vals)), "std": float(np.std(vals)), "ci_low": min(vals),
                 "ci_high": max(vals), "folds": vals}
            (root / task / enc / "result.json").write_text(json.dumps({
                "task": task, "category": cat, "encoder": enc, "primary_metric": metric, "higher_is_better": True,
                "n_folds": folds, "metrics": {metric: m}, "meta": {"title": task.upper()}}))
    (root / "run.json").write_text(json.dumps({"suite": "fake", "encoders": list(encoders),
                                               "tasks": {t: {"category": c} for t, c in tasks.items()}}))
    del rng
    return root


def test_report_ranks_the_planted_order_and_writes_every_file(tmp_path):
    run = make_run(tmp_path / "run")
    paths, a = write_report(run, tmp_path / "rep", n_boot=200, holm=True)
    s = pd.read_csv(paths["leaderboard.csv"])
    assert list(s["encoder"]) == ["strong", "mid", "weak"]
    assert s["avg_rank"].is_monotonic_increasing and s["avg_rank"].iloc[0] < 1.5
    assert s["tasks_won"].sum() >= len(TASKS) and s["tasks_won_shared"].sum() == pytest.approx(len(TASKS))
    assert {"avg_rank_wsi_classification", "avg_rank_survival", "avg_rank_roi_classification"} <= set(s.columns)
    # Ranks recomputed from the written scores equal the report's.
    sc = pd.read_csv(paths["scores.csv"])
    manual = sc.pivot(index="task", columns="encoder", values="value").rank(axis=1, ascending=False)
    got = sc.pivot(index="task", columns="encoder", values="rank")
    pd.testing.assert_frame_equal(manual, got, check_names=False, check_dtype=False)
    # Paired P-values: the weak encoder is worse than the reference on every task.
    pv = pd.read_csv(paths["pvalues"])
    assert set(pv["encoder_b"]) == {"strong"} and (pv.loc[pv["encoder_a"] == "weak", "p"] < 0.01).all()
    assert (pv["p_holm"] >= pv["p"] - 1e-12).all() and len(pv) == 2 * len(TASKS)
    assert (a.across["p_holm"] >= a.across["p"]).all() and s["p_across_tasks"].isna().sum() == 1
    assert a.friedman is not None and a.cd == pytest.approx(2.343701 * np.sqrt(3 * 4 / (6 * 6)), rel=1e-5)
    for f in ("rank_heatmap", "cd_diagram", "average_metric", "radar"):
        png = tmp_path / "rep" / "figures" / f"{f}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["leaderboard.md"].read_text()
    assert "## Survival (2 tasks)" in md and "| strong |" in md.replace("**", "")
    assert re.search(r"\d\.\d{3} \(\d(\.5)?\) \[\d\.\d{3}, \d\.\d{3}\]", md)  # value (rank) [CI low, high]
    html = paths["leaderboard.html"].read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html.replace("http-equiv", "")


def test_gaps_are_listed_and_ranking_uses_complete_tasks(tmp_path):
    run = make_run(tmp_path / "run", skip=(("cls-a", "weak"),))
    (run / "surv-b" / "mid" / "result.json").write_text("{not json")
    paths, a = write_report(run, n_boot=0)
    assert a.gaps == [("cls-a", "weak"), ("surv-b", "mid")]
    assert len(a.ranks) == len(TASKS) - 2 and "cls-a" not in a.ranks.index
    assert any("unreadable" in p for p in a.results.problems)
    md = paths["leaderboard.md"].read_text()
    assert "missing: cls-a / weak" in md and "## Gaps" in md
    assert main(["arena", "report", str(run), "--n-boot", "0", "--quiet"]) == 1


def test_one_encoder_gets_a_table_and_a_reason(tmp_path):
    run = make_run(tmp_path / "run", encoders={"only": 1.0})
    paths, a = write_report(run, n_boot=50)
    assert a.ranks is None and a.pvalues is None
    s = pd.read_csv(paths["leaderboard.csv"])
    assert list(s["encoder"]) == ["only"] and "avg_rank" not in s.columns
    assert "nothing to rank it against" in paths["leaderboard.md"].read_text()
    assert not (run / "figures").exists()


def test_reference_encoder_and_direction(tmp_path):
    run = make_run(tmp_path / "run", tasks={"cls-a": "wsi_classification", "ret-a": "retrieval"})
    a = analyse(collect(run), run, n_boot=100, reference="weak")
    assert set(a.pvalues["task"]) == {"cls-a", "ret-a"}, a.notes  # acc@1 is registered on demand
    assert a.reference == "weak" and set(a.pvalues["encoder_b"]) == {"weak"}
    # "strong worse than weak" is false: large P; the paired bootstrap agrees with the planted order.
    assert (a.pvalues.loc[a.pvalues["encoder_a"] == "strong", "p"] > 0.99).all()
    pairs = analyse(collect(run), run, n_boot=50, all_pairs=True).pvalues
    assert len(pairs) == 2 * 3 * 2 and set(pairs["encoder_b"]) == set(ENCODERS)
    with pytest.raises(GpfmError, match="reference"):
        analyse(collect(run), run, n_boot=0, reference="nobody")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(GpfmError, match="result.json"):
        collect(tmp_path)


# ------------------------------------------------------------------------------------------ headless browser
class _Rows(HTMLParser):
    """Counts body rows and reads the first cell texts of the table with a given id."""

    def __init__(self, table_id: str):
        super().__init__()
        self.id, self.inside, self.in_body, self.rows, self.cell, self.depth = table_id, False, False, [], None, 0
        self.root_attrs: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root_attrs = a
        if tag == "table" and a.get("id") == self.id:
            self.inside = True
        elif self.inside and tag == "tbody":
            self.in_body = True
        elif self.in_body and tag == "tr":
            self.rows.append([])
        elif self.in_body and tag == "td":
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tbody":
            self.in_body = False
        elif tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium not installed (Debian package 'chromium'; `make test` installs it)")


def _dump_dom(browser: str, page: Path, profile: Path) -> tuple[str, str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000",
           "--dump-dom", page.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


def test_html_loads_in_headless_chromium_without_errors_and_sorts(tmp_path):
    browser = _chromium()
    run = make_run(tmp_path / "run")
    paths, _ = write_report(run, n_boot=0)
    page = paths["leaderboard.html"]
    # A copy that sorts the summary by "Avg rank" twice (descending) through the page's own click handler.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", (
        "<script>var th=document.getElementById('summary').tHead.rows[0].cells[2];th.click();th.click();"
        "document.documentElement.setAttribute('data-order',Array.prototype.map.call("
        "document.getElementById('summary').tBodies[0].rows,function(r){return r.cells[1].textContent;})"
        ".join(','));</script></body>")))
    dom, log = _dump_dom(browser, page, tmp_path / "profile1")
    console = [ln for ln in log.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    parser = _Rows("summary")
    parser.feed(dom)
    assert parser.root_attrs.get("data-gpfm-ready") == "1", "the page script did not finish"
    assert len(parser.rows) == len(ENCODERS) and [r[1] for r in parser.rows] == ["strong", "mid", "weak"]
    dom2, log2 = _dump_dom(browser, probe, tmp_path / "profile2")
    assert re.search(r'data-order="weak,mid,strong"', dom2), dom2[:500]
