"""Tokeniser, vocabulary and text metrics: values equal the coco-caption (pycocoevalcap) implementations."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pandas as pd
import pytest

from gpfm.arena import metrics as M
from gpfm.arena import textmetrics as tm
from gpfm.arena.text import BOS, EOS, PAD, UNK, Vocab, encode_batch, normalize, tokenize
from gpfm.io import GpfmError

REFS = ["the tumour is a moderately differentiated adenocarcinoma . margins are clear .",
        "lymph nodes show no metastasis .",
        "poorly differentiated carcinoma with lymphovascular invasion .",
        "benign gastric mucosa ."]
HYPS = ["the tumour is a poorly differentiated adenocarcinoma . margins are involved .",
        "no metastasis in lymph nodes .",
        "poorly differentiated carcinoma .",
        ""]
# pycocoevalcap 1.2 Meteor().compute_score on REFS/HYPS (METEOR 1.5 jar, `-l en -norm`)
METEOR_REF = (0.31081849919931864, [0.3962986114815198, 0.367955402952331, 0.2994794119262229, 0.0])

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs Java (install a JRE)")


@pytest.fixture(scope="module", autouse=True)
def _start_meteor():
    if shutil.which("java"):
        tm.meteor_jar()  # the JVM loads its paraphrase table while the other tests run


def _coco(refs, hyps):
    return {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


def _random_corpus(n, seed=0):
    rng = random.Random(seed)
    words = "the tumour is a poorly moderately well differentiated adenocarcinoma lymph node metastasis . " \
            "invasion margins clear involved no with".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(n)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 30))) for _ in range(n)]
    return [normalize(r) for r in refs], [normalize(h) for h in hyps]


# ------------------------------------------------------------------------------------------- tokeniser
def test_tokenize_rules_and_idempotence():
    s = "Tumour: 3.5 cm, WELL-differentiated.. Patient's margins (R0) clear."
    toks = tokenize(s)
    assert toks == ["tumour", "3.5", "cm", "well", "differentiated", ".", "patients", "margins", "r0", "clear", "."]
    assert tokenize(" ".join(toks)) == toks
    assert tokenize("... ;;; ---") == []


def test_vocab_min_freq_unknown_and_specials():
    v = Vocab.build(["a b c a", "a b d"], min_freq=2)
    assert v.tokens[:4] == ("<pad>", "<bos>", "<eos>", "<unk>") and v.tokens[4:] == ("a", "b")
    assert v.encode(["a", "zzz", "b"]) == [4, UNK, 5]
    assert v.decode([BOS, 4, UNK, 5, EOS, 4]) == "a <unk> b"
    with pytest.raises(GpfmError):
        Vocab(("x",))


def test_encode_batch_pads_and_truncates_with_warning(caplog):
    v = Vocab.build(["a b c"], min_freq=1)
    ids = encode_batch(v, ["a b c", "c"], max_len=2)
    assert "1 of 2 reports are longer than max_len=2 tokens (longest 3) and were truncated" in caplog.text
    assert ids.tolist() == [[BOS, 4, 5, EOS], [BOS, 6, EOS, PAD]]


# ------------------------------------------------------------------------------------------------ metrics
def test_bleu_rouge_cider_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge, my_lcs

    for refs, hyps in [(REFS, HYPS), _random_corpus(40)]:
        gts, res = _coco(refs, hyps)
        df = pd.DataFrame({"reference": refs, "hypothesis": hyps})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for k in range(4):
            assert tm.caption_metric(f"bleu_{k + 1}", df) == pytest.approx(bleu[k], rel=1e-12, abs=1e-15)
        assert tm.caption_metric("rouge_l", df) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
        assert tm.caption_metric("cider", df) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
        for r, h in zip(refs, hyps):
            assert tm.lcs_length(r.split(" "), h.split(" ")) == my_lcs(r.split(" "), h.split(" "))


@needs_java
def test_meteor_equals_meteor_jar():
    df = pd.DataFrame({"reference": REFS, "hypothesis": HYPS})
    assert tm.caption_metric("meteor", df) == pytest.approx(METEOR_REF[0], abs=1e-12)
    per = tm.meteor_from_stats(tm.meteor_stats(REFS, HYPS))
    np.testing.assert_allclose(per, METEOR_REF[1], atol=1e-12)


@needs_java
def test_bootstrap_resamples_equal_reference_on_each_resample():
    from pycocoevalcap.bleu.bleu import Bleu

    refs, hyps = _random_corpus(30, seed=1)
    df = pd.DataFrame({"reference": refs, "hypothesis": hyps})
    idx = M.bootstrap_indices(len(df), 5, seed=3)
    b4 = M.metric_on_resamples("bleu_4", df, idx)
    met = M.metric_on_resamples("meteor", df, idx)
    stats = tm.meteor_stats(refs, hyps)
    jar = tm.meteor_jar()
    for row, v_bleu, v_met in zip(idx, b4, met):
        gts, res = _coco([refs[i] for i in row], [hyps[i] for i in row])
        assert v_bleu == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], rel=1e-9, abs=1e-15)
        lines = [" ".join(map(str, stats[i])) for i in row]
        assert v_met == pytest.approx(jar.eval(lines)[0], abs=1e-12)  # the jar's own aggregation
    summary = M.bootstrap("bleu_1", df, n_boot=200, seed=0)
    assert summary["ci_low"] <= summary["value"] <= summary["ci_high"] and summary["std"] > 0


def test_caption_metrics_normalise_raw_text():
    raw = pd.DataFrame({"reference": ["Margins: CLEAR."], "hypothesis": ["margins clear ."]})
    assert tm.caption_metric("bleu_1", raw) == pytest.approx(1.0)
    with pytest.raises(GpfmError, match="no 'hypothesis' column"):
        tm.caption_metric("bleu_1", raw.drop(columns="hypothesis"))


def test_token_f1():
    assert tm.token_f1_one("poorly differentiated", "poorly differentiated") == 1.0
    assert tm.token_f1_one("poorly differentiated", "well differentiated") == pytest.approx(0.5)
    assert tm.token_f1_one("yes", "no") == 0.0
