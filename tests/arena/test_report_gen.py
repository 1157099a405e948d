"""Report generation: decoding is exact, a planted signal is learned, and the arena handler runs end to end."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gpfm.arena import report_gen as rg
from gpfm.arena import textmetrics as tm
from gpfm.arena.decoder import DecoderConfig, TextDecoder, VisualMemory, beam_search, greedy_decode
from gpfm.arena.gen_common import TrainConfig
from gpfm.arena.text import EOS
from gpfm.arena.textmetrics import caption_metric
from gpfm.io import GpfmError, read_json, write_h5

PHRASES = [["well differentiated", "moderately differentiated", "poorly differentiated"],
           ["clear margins", "involved margins", "close margins"],
           ["no metastasis", "nodal metastasis", "distant metastasis"],
           ["low grade", "intermediate grade", "high grade"]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one intra-op thread is much faster than two on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    if shutil.which("java"):
        tm.meteor_jar()  # start the METEOR JVM early; it loads while the models train
    yield
    torch.set_num_threads(old)


def planted(n: int, seed: int = 0, tiles: int = 8, dim: int = 16):
    """Bags whose 4 hidden variables (3 values each) decide the report's 8 content words."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 3, (n, 4))
    centers = np.random.default_rng(99).normal(size=(4, 3, dim)) * 1.5
    reports, bags = [], []
    for a, b, c, d in z:
        reports.append(f"{PHRASES[0][a]} {PHRASES[1][b]} . {PHRASES[2][c]} {PHRASES[3][d]} .")
        x = rng.normal(size=(tiles, dim)) * 0.5
        for v, val in enumerate((a, b, c, d)):
            x[2 * v:2 * v + 2] += centers[v, val]  # two tiles per variable carry it
        bags.append(x[rng.permutation(tiles)].astype(np.float32))
    return bags, reports


def small_settings(**kw) -> rg.ReportSettings:
    return rg.ReportSettings(min_freq=1, beam=1, n_boot=50, **kw,
                             decoder=DecoderConfig(d_model=64, n_layers=2, n_heads=4, memory_tokens=8, max_len=24,
                                                   dropout=0.1),
                             train=TrainConfig(epochs=10, batch_size=32, lr=2e-3, patience=4))


# ------------------------------------------------------------------------------------------------ decoding
def test_beam_search_equals_exhaustive_search():
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=4, memory_tokens=0, max_len=3, dropout=0.0)
    dec = TextDecoder(6, cfg).eval()
    with torch.no_grad():
        dec.embed.weight.mul_(6.0)  # peaky next-token distributions: the search problem is not trivial
    mem = torch.randn(3, 5, 32)

    def logprob(seq, m):
        logp = torch.log_softmax(dec(torch.tensor([[1] + seq[:-1]]), m)[0].float(), -1)
        return sum(logp[i, t].item() for i, t in enumerate(seq))

    for alpha in (0.0, 1.5):
        got = beam_search(dec, mem, beam=64, alpha=alpha)
        for i in range(len(mem)):
            best = max((logprob([*w, EOS], mem[i:i + 1]) / ((5 + len(w)) / 6) ** alpha, [*w, EOS])
                        for n in range(4) for w in itertools.product(range(3, 6), repeat=n))
            assert got[i, :len(best[1])].tolist() == best[1]
    # beam 1 is greedy; batched beams equal one-at-a-time beams
    assert torch.equal(beam_search(dec, mem, beam=1), greedy_decode(dec, mem))
    b3 = beam_search(dec, mem, beam=3, alpha=0.6)
    for i in range(len(mem)):
        one = beam_search(dec, mem[i:i + 1], beam=3, alpha=0.6)[0]
        assert b3[i, :len(one)].tolist() == one.tolist()


def test_cached_incremental_decoding_equals_full_forward():
    torch.manual_seed(1)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=4, memory_tokens=0, max_len=10, dropout=0.1)
    dec = TextDecoder(11, cfg).eval()
    mem = torch.randn(3, 6, 32)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True  # padded memory
    ids = torch.randint(3, 11, (3, 7))
    full = dec(ids, mem, mask)
    state = dec.start(mem, mask)
    steps = torch.stack([dec.step(ids[:, t], state) for t in range(ids.size(1))], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_attention_pool_fits_many_tiles_and_ignores_padding():
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=32, n_heads=4, memory_tokens=8, dropout=0.0)
    vm = VisualMemory(24, cfg).eval()
    big = torch.randn(1, 12000, 24)
    mem, mask = vm(big)
    assert mem.shape == (1, 8, 32) and mask is None
    small = torch.randn(1, 50, 24)
    padded = torch.cat([small, torch.randn(1, 30, 24)], 1)
    pad_mask = torch.zeros(1, 80, dtype=torch.bool)
    pad_mask[:, 50:] = True
    torch.testing.assert_close(vm(padded, pad_mask)[0], vm(small)[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- planted
def test_planted_reports_are_learned_and_shuffled_features_are_not():
    bags, reports = planted(240)
    tr, va, te = list(range(160)), list(range(160, 180)), list(range(180, 240))
    s = small_settings()
    scores = {}
    for shuffled in (False, True):
        perm = np.random.default_rng(1).permutation(240) if shuffled else np.arange(240)
        get = lambda i, perm=perm: bags[perm[i]]  # noqa: E731
        model, vocab, info = rg.train_report_model(get, tr, [reports[i] for i in tr], va,
                                                   [reports[i] for i in va], 16, s, seed=0)
        hyps = rg.generate_reports(model, vocab, get, te, s)
        df = pd.DataFrame({"reference": [reports[i] for i in te], "hypothesis": hyps})
        scores[shuffled] = caption_metric("bleu_4", df)
    assert scores[False] > 0.8, scores
    assert scores[False] > scores[True] + 0.4, scores


# ------------------------------------------------------------------------------------------- end to end
def _write_task(tmp_path, reports, feats, settings, extra_rows=()):
    feat_dir = tmp_path / "features" / "enc"
    for sid, x in feats.items():
        write_h5(feat_dir / f"{sid}.h5", {"features": x.astype(np.float16), "coords": np.zeros((len(x), 2))})
    rows = [{"slide_id": sid, "case_id": f"case{i // 2}", "report": r} for i, (sid, r) in enumerate(reports.items())]
    pd.DataFrame(rows + list(extra_rows)).to_csv(tmp_path / "reports.csv", index=False)
    spec = {"name": "demo-report", "category": "report_generation", "labels": "reports.csv",
            "split": {"protocol": "holdout", "ratios": [0.7, 0.1, 0.2]}, "settings": settings}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "t", "tasks": [spec]}))
    return tmp_path / "suite.yaml"


def _settings_dict():
    return {"min_freq": 1, "beam": 2, "n_boot": 20, "train": {"epochs": 3, "batch_size": 16},
            "decoder": {"d_model": 32, "n_layers": 1, "n_heads": 4, "memory_tokens": 4, "max_len": 20}}


def test_report_task_runs_end_to_end_with_excluded_rows(tmp_path, caplog):
    from gpfm.arena.runner import run_suite
    from gpfm.arena.tasks import load_suite

    bags, reports = planted(40, tiles=6)
    sids = [f"slide{i:02d}" for i in range(40)]
    feats = dict(zip(sids, bags))
    del feats["slide03"]  # labelled, no features: excluded
    extra = [{"slide_id": "slide_empty", "case_id": "case_e", "report": "  ...  "}]
    suite = _write_task(tmp_path, dict(zip(sids, reports)), feats, _settings_dict(), extra)
    data = rg.load(load_suite(suite).tasks[0], tmp_path / "features/enc")
    assert data.excluded == {"empty report": ["slide_empty"], "no features file": ["slide03"]}
    assert "1 empty report(s) excluded (row 42)" in caplog.text
    out = tmp_path / "out"
    report = run_suite(suite, tmp_path / "features", ["enc"], out, quiet=True)
    assert report.exit_code == 0, report.rows
    pred = pd.read_csv(out / "demo-report/enc/fold_0/predictions.csv")
    assert list(pred.columns[:5]) == ["sample_id", "fold", "case_id", "reference", "hypothesis"]
    assert "slide03" not in set(pred["sample_id"])
    m = read_json(out / "demo-report/enc/fold_0/metrics.json")
    wanted = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"} | ({"meteor"} if shutil.which("java") else set())
    assert wanted <= set(m["metrics"]) and m["primary_metric"] == "bleu_4"
    b4 = m["metrics"]["bleu_4"]
    assert b4["value"] == pytest.approx(caption_metric("bleu_4", pred))
    assert b4["ci_low"] <= b4["mean"] <= b4["ci_high"]
    assert read_json(out / "demo-report/enc/result.json")["n_folds"] == 1
    again = run_suite(suite, tmp_path / "features", ["enc"], out, quiet=True)
    assert again.counts == {"done": 1}


def test_patchgastric_style_ids_collect_their_patches(tmp_path):
    from gpfm.arena.tasks import task_from_dict

    rng = np.random.default_rng(0)
    paths = [f"patches/{sid}_{k}.jpg" for sid in ("s1", "s2", "s3") for k in range(3 if sid != "s2" else 2)]
    write_h5(tmp_path / "feat" / "all.h5", {"features": rng.normal(size=(len(paths), 8)).astype(np.float32),
                                            "labels": np.array(["x"] * len(paths), object),
                                            "paths": np.array(paths, object)})
    pd.DataFrame({"id": ["s1", "s2", "s3", "s9"], "subtype": "tub1",
                  "text": ["well differentiated", "poorly differentiated", "signet ring", "lost"]}
                 ).to_csv(tmp_path / "captions.csv", index=False)
    task = task_from_dict({"name": "pg", "category": "report_generation", "labels": "captions.csv"}, tmp_path)
    data = rg.load(task, tmp_path / "feat")
    assert data.samples["sample_id"].tolist() == ["s1", "s2", "s3"]
    assert [len(data.features["internal"].get(s)) for s in ("s1", "s2", "s3")] == [3, 2, 3]
    assert data.excluded == {"no image features": ["s9"]}


def test_bad_report_tables_give_clear_errors(tmp_path):
    from gpfm.arena.tasks import task_from_dict

    write_h5(tmp_path / "f" / "a.h5", {"features": np.full((3, 4), np.nan, np.float32)})
    write_h5(tmp_path / "f" / "b.h5", {"features": np.ones((3, 4), np.float32)})
    (tmp_path / "r.csv").write_text("slide_id,report\na,x\nb,y\n")
    task = task_from_dict({"name": "r", "category": "report_generation", "labels": "r.csv"}, tmp_path)
    with pytest.raises(GpfmError, match=r"a\.h5: features contain NaN"):
        rg.load(task, tmp_path / "f")
    (tmp_path / "r.csv").write_text("slide_id,report\nb,x\nb,y\n")
    with pytest.raises(GpfmError, match="slide_id 'b' appears twice"):
        rg.load(task, tmp_path / "f")
    (tmp_path / "r.csv").write_text("slide_id,diagnosis\nb,x\n")
    with pytest.raises(GpfmError, match="no report text column"):
        rg.load(task, tmp_path / "f")
    bad = task_from_dict({"name": "r", "category": "report_generation", "labels": "r.csv",
                          "settings": {"metrics": ["bleu_4", "spice"]}}, tmp_path)
    with pytest.raises(GpfmError, match="unknown metric 'spice'"):
        rg.validate(bad)
