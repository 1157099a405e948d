"""Report generation on frozen features (arena category `report_generation`; TCGA-Report, PatchGastricADC22).

A small transformer decoder (`gpfm.arena.decoder`) is trained from scratch with teacher forcing to write a
sample's report from its visual memory: the tile features of a slide (pooled to `decoder.memory_tokens`
learned-query tokens, so 10,000+ tiles fit) or the feature(s) of an image. Test reports are decoded by beam
search (`beam`, GNMT `length_penalty`, `decoder.max_len`) and scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr
(`gpfm.arena.textmetrics`, the coco-caption implementations HistGen uses), each with a bootstrap CI over test
reports. The checkpoint is the epoch with the lowest validation loss (teacher-forced cross-entropy). METEOR
needs Java; without it METEOR is left out with a warning (unless it is the primary metric: then an error).

Label tables (CSV / JSON, see `gen_common.read_table`):

- TCGA-Report style, slide level: `slide_id`, `report` (or `text`), optional `case_id` (patient; default: the
  slide), optional `split` (train/val/test). Features: `<features>/<slide_id>.h5`.
- PatchGastricADC22 style, image level: `path` (or `image`, `id`) and `caption` (or `text`), optional `case_id` /
  `slide_id` (grouping for the split), optional `split`. A path names one image of the `gpfm extract --images`
  features; an `id` matching no file stem takes every ``{id}_*`` patch as the bag (the original captions.csv:
  `id,subtype,text`).

Text rules (lower-casing, punctuation, vocabulary with `min_freq`, <unk>) are in `gpfm.arena.text`. Empty reports
(nothing left after normalisation) are excluded, counted in TaskData.excluded and warned about with their rows;
reports longer than `decoder.max_len` tokens are truncated for training with one warning (scored in full).
predictions.csv: `sample_id, case_id, reference, hypothesis` (normalised text).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from gpfm.arena import metrics as M
from gpfm.arena.decoder import DecoderConfig, TextDecoder, VisualMemory, beam_search, caption_loss
from gpfm.arena.gen_common import (
    Bags,
    TrainConfig,
    batches,
    fit,
    fold_seed,
    image_bags,
    make_text_folds,
    pad_bags,
    pick_column,
    read_table,
    slide_bags,
    text_value,
)
from gpfm.arena.splits import Split
from gpfm.arena.text import Vocab, encode_batch, normalize
from gpfm.arena.textmetrics import CAPTION_METRICS, meteor_jar
from gpfm.config import from_dict
from gpfm.io import GpfmError

log = logging.getLogger("gpfm.arena")

TEXT_COLUMNS = ("report", "caption", "text")
IMAGE_COLUMNS = ("path", "image", "image_path", "id", "image_id")


@dataclass
class ReportSettings:
    """`settings:` of a report_generation task."""

    level: str = "auto"  # slide | image | auto (slide when the table has a slide_id column and no image column)
    min_freq: int = 3  # vocabulary: training-report tokens seen at least this often
    beam: int = 3  # 1 = greedy
    length_penalty: float = 0.6  # GNMT alpha
    metrics: list[str] = field(default_factory=lambda: list(CAPTION_METRICS))
    n_boot: int = 1000
    eval_batch_size: int = 16
    cache_gb: float = 4.0  # hold slide bags in memory up to this size
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def settings_of(task) -> ReportSettings:
    s = from_dict(ReportSettings, task.settings, "settings")
    s.decoder.check()
    if s.level not in ("auto", "slide", "image"):
        raise GpfmError(f"{task.source}: settings.level must be auto, slide or image (got {s.level!r})")
    bad = [m for m in s.metrics if m not in CAPTION_METRICS]
    if bad:
        raise GpfmError(f"{task.source}: unknown metric '{bad[0]}' in settings.metrics "
                        f"(known: {', '.join(CAPTION_METRICS)})")
    if task.primary_metric not in s.metrics:
        raise GpfmError(f"{task.source}: primary_metric '{task.primary_metric}' is not in settings.metrics")
    return s


def validate(task) -> None:
    settings_of(task)


# ------------------------------------------------------------------------------------------------ loading
def _level(df: pd.DataFrame, setting: str) -> str:
    if setting != "auto":
        return setting
    return "slide" if "slide_id" in df.columns and not any(c in df.columns for c in IMAGE_COLUMNS[:3]) else "image"


def load_cohort(labels: Path, features_dir: Path, settings: ReportSettings, cohort: str
                ) -> tuple[pd.DataFrame, pd.DataFrame, Bags, dict[str, list[str]]]:
    """(samples, labelled, bags, excluded) of one label table and its features folder."""
    df = read_table(labels)
    level = _level(df, settings.level)
    key = pick_column(df, ("slide_id",) if level == "slide" else IMAGE_COLUMNS, labels,
                      "slide id" if level == "slide" else "image")
    text = pick_column(df, TEXT_COLUMNS, labels, "report text")
    case = pick_column(df, ("case_id", "patient_id", "slide_id"), labels, "case", required=False)
    keys = [text_value(v) for v in df[key]]
    if any(not k for k in keys):
        raise GpfmError(f"{labels}: row {keys.index('') + 2} has an empty {key}; fill it in or remove the row")
    dup = pd.Series(keys)[pd.Series(keys).duplicated()]
    if len(dup):
        raise GpfmError(f"{labels}: {key} {dup.iloc[0]!r} appears twice; give each sample one report")
    reports = [text_value(v) for v in df[text]]
    excluded: dict[str, list[str]] = {}
    empty = [i for i, r in enumerate(reports) if not normalize(r)]
    if empty:
        excluded["empty report"] = [keys[i] for i in empty]
        log.warning("%s: %d empty report(s) excluded (row%s %s); fill them in or remove the rows", labels,
                    len(empty), "s" if len(empty) > 1 else "", ", ".join(str(i + 2) for i in empty[:10]))
    keep = [i for i in range(len(df)) if i not in set(empty)]
    table = pd.DataFrame({"sample_id": [keys[i] for i in keep],
                          "case_id": [text_value(df[case].iloc[i]) or keys[i] if case else keys[i] for i in keep],
                          "cohort": cohort, "stratum": "all", "report": [reports[i] for i in keep]})
    if "split" in df.columns:
        table["split"] = [text_value(df["split"].iloc[i]).lower() for i in keep]
    if level == "slide":
        bags, missing = slide_bags(features_dir, table["sample_id"].tolist(), settings.cache_gb)
        split_of = {}
    else:
        bags, split_of, missing = image_bags(features_dir, table["sample_id"].tolist())
    for reason, ids in missing.items():
        excluded.setdefault(reason, []).extend(ids)
        log.warning("%s: %d sample(s) excluded: %s (e.g. %s)", labels, len(ids), reason, ids[0])
    labelled = table
    if "split" not in table.columns and split_of and set(split_of.values()) & {"train", "test", "val"}:
        labelled = table[table["sample_id"].isin(split_of)].assign(split=lambda t: t["sample_id"].map(split_of))
    samples = labelled[labelled["sample_id"].isin(bags.keys())].reset_index(drop=True)
    samples["bag"] = samples["sample_id"]
    return samples, labelled[["sample_id", "case_id", "cohort", "stratum"] +
                             (["split"] if "split" in labelled.columns else [])], bags, excluded


def load(task, features_dir: Path, external_dir: Path | None = None):
    """TaskData: samples (sample_id, case_id, cohort, stratum, report, bag[, split]); features {cohort: Bags}."""
    from gpfm.arena.runner import TaskData

    s = settings_of(task)
    samples, labelled, bags, excluded = load_cohort(task.labels, features_dir, s, "internal")
    feats = {"internal": bags}
    if task.external is not None and external_dir is not None:
        es, el, eb, ee = load_cohort(task.external.labels, external_dir, s, "external")
        if eb.dim != bags.dim:
            raise GpfmError(f"{external_dir}: external features have dim {eb.dim}, internal {bags.dim}")
        samples, labelled = pd.concat([samples, es], ignore_index=True), pd.concat([labelled, el], ignore_index=True)
        feats["external"] = eb
        for k, v in ee.items():
            excluded.setdefault(k, []).extend(v)
    return TaskData(samples=samples, features=feats, dim=bags.dim, labelled=labelled, excluded=excluded)


def make_folds(task, data, seed: int) -> list[Split]:
    """The task's split (see gen_common.make_text_folds; external cohorts: split protocol `external`)."""
    return make_text_folds(task, data.split_table, seed)


# -------------------------------------------------------------------------------------------------- model
class ReportModel(nn.Module):
    """Visual memory + text decoder."""

    def __init__(self, in_dim: int, vocab_size: int, cfg: DecoderConfig):
        super().__init__()
        self.memory = VisualMemory(in_dim, cfg)
        self.decoder = TextDecoder(vocab_size, cfg)

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        mem, mmask = self.memory(x, mask)
        return caption_loss(self.decoder, ids, mem, mmask)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, mask: torch.Tensor | None, beam: int = 3, alpha: float = 0.6,
                 max_len: int | None = None) -> torch.Tensor:
        mem, mmask = self.memory(x, mask)
        return beam_search(self.decoder, mem, mmask, beam, max_len, alpha)


def _bag_getter(data) -> callable:
    cohort = dict(zip(data.samples["sample_id"], data.samples["cohort"]))
    bag = dict(zip(data.samples["sample_id"], data.samples["bag"]))
    return lambda sid: data.features[cohort[sid]].get(bag[sid])


def train_report_model(bags: list[np.ndarray] | callable, train_ids: list, train_texts: list[str],
                       val_ids: list, val_texts: list[str], dim: int, s: ReportSettings, seed: int,
                       device: str = "cpu") -> tuple[ReportModel, Vocab, dict]:
    """Build the vocabulary from the training reports and train a ReportModel; returns (model, vocab, info).

    `bags(sample)` returns the (N, D) features of a sample id in train_ids / val_ids.
    """
    torch.manual_seed(seed)
    vocab = Vocab.build(train_texts, s.min_freq)
    tr = encode_batch(vocab, train_texts, s.decoder.max_len)
    va = encode_batch(vocab, val_texts, s.decoder.max_len) if val_texts else tr[:0]
    model = ReportModel(dim, len(vocab), s.decoder).to(device)

    def loss_fn(pos: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        ids, ids_arr = (train_ids, tr) if rng is not None else (val_ids, va)
        x, mask = pad_bags([bags(ids[i]) for i in pos], s.train.max_tiles, rng, device)
        seq = ids_arr[pos]
        seq = seq[:, :int((seq != 0).sum(1).max())]  # trim shared padding
        return model.loss(x, mask, torch.from_numpy(seq).to(device))

    info = fit(model, loss_fn, len(train_ids), len(val_ids), s.train, seed)
    info.update(vocab_size=len(vocab), unk_rate_train=float((tr == 3).sum() / max((tr > 2).sum(), 1)))
    return model, vocab, info


@torch.no_grad()
def generate_reports(model: ReportModel, vocab: Vocab, bags, ids: list, s: ReportSettings, device: str = "cpu",
                     beam: int | None = None) -> list[str]:
    """Decoded text for each sample id (batched beam search, or greedy with beam 1)."""
    model.eval()
    out: list[str] = []
    for pos in batches(range(len(ids)), s.eval_batch_size):
        x, mask = pad_bags([bags(ids[i]) for i in pos], device=device)
        seqs = model.generate(x, mask, s.beam if beam is None else beam, s.length_penalty)
        out += [vocab.decode(row) for row in seqs.cpu().tolist()]
    return out


def run_fold(task, data, split: Split, seed: int, device: str = "cpu"):
    """Train on split.train (vocabulary too), select on split.val loss, write reports for split.test."""
    from gpfm.arena.runner import FoldResult

    s = settings_of(task)
    names, skipped = list(s.metrics), []
    if "meteor" in names and task.primary_metric != "meteor" and shutil.which("java") is None:
        log.warning("%s: METEOR skipped: it needs Java (the pycocoevalcap METEOR 1.5 jar); install a JRE, e.g. "
                    "`apt-get install default-jre-headless`", task.name)
        names, skipped = [m for m in names if m != "meteor"], ["meteor"]
    if "meteor" in names:
        meteor_jar()  # the JVM loads its paraphrase table while the decoder trains
    rs = fold_seed(seed, split.fold)
    by_id = data.samples.set_index("sample_id")
    get = _bag_getter(data)
    train, val, test = list(split.train), list(split.val), list(split.test)
    model, vocab, info = train_report_model(get, train, by_id.loc[train, "report"].tolist(), val,
                                            by_id.loc[val, "report"].tolist(), data.dim, s, rs, device)
    t0 = time.perf_counter()
    hyps = generate_reports(model, vocab, get, test, s, device)
    info["decode_seconds"] = round(time.perf_counter() - t0, 3)
    pred = pd.DataFrame({"sample_id": test, "case_id": by_id.loc[test, "case_id"].tolist(),
                         "reference": [normalize(r) for r in by_id.loc[test, "report"]], "hypothesis": hyps})
    metrics = M.bootstrap_all(names, pred, s.n_boot, rs)
    info.pop("history", None)
    if skipped:
        info["skipped_metrics"] = skipped
    return FoldResult(predictions=pred, metrics=metrics, info=info)
