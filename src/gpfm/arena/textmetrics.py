"""Text-generation metrics as the captioning literature computes them (coco-caption / pycocoevalcap, as HistGen).

BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D of hypotheses against one reference each, all on `text.normalize`d
strings. Each metric is split into per-report *sufficient statistics* and a combine step, so a corpus score and
1,000 bootstrap resamples (`counts @ stats`) cost one pass over the reports:

- BLEU: per-report n-gram counts from pycocoevalcap's own `cook_test`; corpus BLEU from the summed counts with
  pycocoevalcap's smoothing constants and brevity penalty ("closest" reference length).
- METEOR: per-report statistics from the METEOR 1.5 jar that ships with pycocoevalcap (Java, offline, with its
  English paraphrase table), combined as the jar's ``EVAL`` does (summed statistics, then Fmean and
  fragmentation penalty with the jar's English parameters). The JVM starts once per process (~10 s).
- ROUGE-L: per-report LCS F-measure (beta 1.2, pycocoevalcap's definition); corpus = mean. The LCS uses a
  bit-parallel algorithm (exactly pycocoevalcap's value, much faster on long reports).
- CIDEr-D: pycocoevalcap's scorer (document frequencies from the references of the scored set). Bootstrap
  resamples average the per-report scores of the full set (document frequencies are not re-estimated).

Tests check every value against the pycocoevalcap implementation on fixed strings.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gpfm.arena.text import normalize, tokenize
from gpfm.io import GpfmError

TINY, SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing constants
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


# ----------------------------------------------------------------------------------------------------- BLEU
@functools.lru_cache(maxsize=200_000)
def bleu_stats_one(reference: str, hypothesis: str, n: int = 4) -> tuple[float, ...]:
    """(testlen, reflen, guess_1..n, correct_1..n) of one pair, counted by pycocoevalcap's cook_refs/cook_test."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    c = cook_test(hypothesis, cook_refs([reference], n=n), eff="closest", n=n)
    return (c["testlen"], c["reflen"], *c["guess"], *c["correct"])


def bleu_stats(references: Sequence[str], hypotheses: Sequence[str], n: int = 4) -> np.ndarray:
    """(N, 2 + 2n) BLEU statistics per pair."""
    return np.array([bleu_stats_one(r, h, n) for r, h in zip(references, hypotheses)], dtype=float
                    ).reshape(len(references), 2 + 2 * n)


def bleu_from_stats(summed: np.ndarray, order: int, n: int = 4) -> np.ndarray:
    """Corpus BLEU-`order` from summed statistics (..., 2 + 2n), exactly as pycocoevalcap's BleuScorer."""
    testlen, reflen = summed[..., 0], summed[..., 1]
    guess, correct = summed[..., 2:2 + n], summed[..., 2 + n:2 + 2 * n]
    logp = np.log((correct[..., :order] + TINY) / (guess[..., :order] + SMALL)).sum(-1)
    bleu = np.exp(logp / order)
    ratio = (testlen + TINY) / (reflen + SMALL)
    return np.where(ratio < 1, bleu * np.exp(1 - 1 / ratio), bleu)


# --------------------------------------------------------------------------------------------------- METEOR
_METEOR_PARAMS = (0.85, 0.20, 0.60, 0.75)  # alpha, beta, gamma, delta of METEOR 1.5 `-l en` (task default)
_METEOR_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])  # exact, stem, synonym, paraphrase


class _MeteorJar:
    """One long-lived `java -jar meteor-1.5.jar - - -stdio -l en -norm` process (as pycocoevalcap runs it)."""

    def __init__(self) -> None:
        import pycocoevalcap.meteor.meteor as m

        folder = Path(m.__file__).parent
        jar = folder / "meteor-1.5.jar"
        if not (jar.is_file() and (folder / "data" / "paraphrase-en.gz").is_file()):
            raise GpfmError(f"{jar}: METEOR jar or its paraphrase data is missing; reinstall pycocoevalcap")
        java = shutil.which("java")
        if java is None:
            raise GpfmError("METEOR needs Java on PATH (the pycocoevalcap METEOR 1.5 jar); install a JRE, "
                            "e.g. `apt-get install default-jre-headless`")
        self.proc = subprocess.Popen([java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"],
                                     cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.lock = threading.Lock()

    def stats(self, pairs: Sequence[tuple[str, str]], chunk: int = 200) -> list[str]:
        """METEOR statistics lines for (reference, hypothesis) pairs (chunked so pipes never fill up)."""
        out: list[str] = []
        with self.lock:
            for i in range(0, len(pairs), chunk):
                part = pairs[i:i + chunk]
                lines = "".join(f"SCORE ||| {_clean(r)} ||| {_clean(h)}\n" for r, h in part)
                self.proc.stdin.write(lines.encode())
                self.proc.stdin.flush()
                for _ in part:
                    line = self.proc.stdout.readline().decode().strip()
                    if not line:
                        raise GpfmError("METEOR jar stopped answering (out of memory? it needs ~2 GB)")
                    out.append(line)
        return out

    def eval(self, stats_lines: Sequence[str]) -> tuple[float, list[float]]:
        """The jar's own EVAL: (aggregate score, per-line scores). Used to check `meteor_from_stats`."""
        with self.lock:
            self.proc.stdin.write(("EVAL ||| " + " ||| ".join(stats_lines) + "\n").encode())
            self.proc.stdin.flush()
            seg = [float(self.proc.stdout.readline()) for _ in stats_lines]
            return float(self.proc.stdout.readline()), seg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _clean(s: str) -> str:
    return " ".join(str(s).replace("|||", " ").split())


@functools.cache
def meteor_jar() -> _MeteorJar:
    """The process-wide METEOR jar, started on first use and stopped at exit."""
    jar = _MeteorJar()
    atexit.register(jar.close)
    return jar


_METEOR_CACHE: dict[tuple[str, str], tuple[float, ...]] = {}


def meteor_stats(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """(N, 23) METEOR 1.5 sufficient statistics per pair (cached per pair for this process)."""
    pairs = list(zip(references, hypotheses))
    todo = list(dict.fromkeys(p for p in pairs if p not in _METEOR_CACHE))
    if len(_METEOR_CACHE) + len(todo) > 1_000_000:
        _METEOR_CACHE.clear()
        todo = list(dict.fromkeys(pairs))
    if todo:
        for p, line in zip(todo, meteor_jar().stats(todo)):
            _METEOR_CACHE[p] = tuple(float(x) for x in line.split())
    return np.array([_METEOR_CACHE[p] for p in pairs], dtype=float).reshape(len(pairs), 23)


def meteor_from_stats(s: np.ndarray) -> np.ndarray:
    """METEOR score of summed statistics (..., 23), as MeteorScorer.computeMetrics does."""
    alpha, beta, gamma, delta = _METEOR_PARAMS
    tlen, rlen, tfun, rfun = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    stage = s[..., 4:20].reshape(*s.shape[:-1], 4, 4)  # per module: test content, ref content, test fn, ref fn
    tc, rc, tf, rf = (stage[..., k] for k in range(4))
    chunks, twm, rwm = s[..., 20], s[..., 21], s[..., 22]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_w = (tc * _METEOR_WEIGHTS).sum(-1) * delta + (tf * _METEOR_WEIGHTS).sum(-1) * (1 - delta)
        r_w = (rc * _METEOR_WEIGHTS).sum(-1) * delta + (rf * _METEOR_WEIGHTS).sum(-1) * (1 - delta)
        precision = t_w / (delta * (tlen - tfun) + (1 - delta) * tfun)
        recall = r_w / (delta * (rlen - rfun) + (1 - delta) * rfun)
        fmean = 1.0 / ((1 - alpha) / precision + alpha / recall)
        exact = ((tc + tf).sum(-1) == tlen) & ((rc + rf).sum(-1) == rlen) & (chunks == 1)
        frag = np.where(exact, 0.0, chunks / ((twm + rwm) / 2))
        score = fmean * (1.0 - gamma * frag ** beta)
    return np.maximum(np.nan_to_num(score, nan=0.0), 0.0)


# -------------------------------------------------------------------------------------------------- ROUGE-L
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of token lists (bit-parallel, O(len(a) * len(b) / word))."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for tok in a:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


@functools.lru_cache(maxsize=200_000)
def rouge_l_one(reference: str, hypothesis: str, beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE-L of one pair (tokens split on single spaces, as there)."""
    ref, hyp = reference.split(" "), hypothesis.split(" ")
    lcs = lcs_length(ref, hyp)
    p, r = lcs / len(hyp), lcs / len(ref)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0


# ---------------------------------------------------------------------------------------------------- CIDEr
def cider_scores(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """Per-report CIDEr-D (pycocoevalcap, document frequencies from these references)."""
    if not len(references):
        return np.zeros(0)
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for r, h in zip(references, hypotheses):
        scorer += (h, [r])
    return np.asarray(scorer.compute_score()[1], dtype=float)


# ------------------------------------------------------------------------------------------- VQA answers
def token_f1_one(reference: str, hypothesis: str) -> float:
    """SQuAD-style bag-of-words F1 of two answers (normalised tokens, periods ignored)."""
    ref = Counter(t for t in tokenize(reference) if t != ".")
    hyp = Counter(t for t in tokenize(hypothesis) if t != ".")
    if not ref or not hyp:
        return float(ref == hyp)
    common = sum((ref & hyp).values())
    if common == 0:
        return 0.0
    p, r = common / sum(hyp.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------------------------------- on predictions
def text_pairs(df: pd.DataFrame, ref_col: str = "reference", hyp_col: str = "hypothesis"
               ) -> tuple[list[str], list[str]]:
    """Normalised (references, hypotheses) from two predictions columns (missing values read as empty)."""
    for c in (ref_col, hyp_col):
        if c not in df.columns:
            raise GpfmError(f"predictions have no '{c}' column (columns: {', '.join(map(str, df.columns))})")
    refs = [normalize(x) if isinstance(x, str) else "" for x in df[ref_col]]
    hyps = [normalize(x) if isinstance(x, str) else "" for x in df[hyp_col]]
    return refs, hyps


def _weighted_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts @ values / np.where(total > 0, total, 1), np.nan)


def caption_batch(name: str, df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    """Metric `name` (one of CAPTION_METRICS) for each resample row of `counts` (n_boot, n)."""
    refs, hyps = text_pairs(df)
    if name.startswith("bleu_"):
        return bleu_from_stats(counts @ bleu_stats(refs, hyps), int(name[5:]))
    if name == "meteor":
        return meteor_from_stats(counts @ meteor_stats(refs, hyps))
    if name == "rouge_l":
        return _weighted_mean(np.array([rouge_l_one(r, h) for r, h in zip(refs, hyps)]), counts)
    if name == "cider":
        return _weighted_mean(cider_scores(refs, hyps), counts)
    raise GpfmError(f"unknown caption metric '{name}' (known: {', '.join(CAPTION_METRICS)})")


def caption_metric(name: str, df: pd.DataFrame) -> float:
    """Corpus value of metric `name` on a predictions table with `reference` and `hypothesis` columns."""
    if name == "cider":  # the corpus CIDEr of exactly these rows (document frequencies from them)
        refs, hyps = text_pairs(df)
        return float(cider_scores(refs, hyps).mean()) if refs else float("nan")
    return float(caption_batch(name, df, np.ones((1, len(df))))[0])


def caption_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """All CAPTION_METRICS for raw texts (normalised here), e.g. for a quick evaluation outside the arena."""
    df = pd.DataFrame({"reference": list(references), "hypothesis": list(hypotheses)})
    return {m: caption_metric(m, df) for m in CAPTION_METRICS}


def register_caption_metrics() -> None:
    """Put the caption metrics into the arena registry (idempotent)."""
    from gpfm.arena.metrics import register_metric

    for name in CAPTION_METRICS:
        register_metric(name, _FNS[name][0], True, _FNS[name][1])


_FNS = {m: (functools.partial(caption_metric, m), functools.partial(caption_batch, m)) for m in CAPTION_METRICS}


register_caption_metrics()
