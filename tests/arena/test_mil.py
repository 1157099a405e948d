"""MIL heads: one interface, masks equal unpadded bags, attention finds the planted tiles; early-stopping rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpfm.arena.mil import ABMIL, MIL_MODELS, attention_scores, build_mil
from gpfm.arena.train import EarlyStopping, MILSettings, forward_bags, train_mil
from gpfm.io import GpfmError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_abmil_is_the_papers_architecture():
    m = build_mil("abmil", 1024, 3)
    assert isinstance(m, ABMIL)
    assert [type(x).__name__ for x in m.fc] == ["Linear", "ReLU", "Dropout"] and m.fc[2].p == 0.25
    assert (m.fc[0].in_features, m.fc[0].out_features) == (1024, 512)
    assert [type(x).__name__ for x in m.attention_net] == ["Linear", "Tanh", "Linear"]
    assert (m.attention_net[0].out_features, m.attention_net[2].out_features) == (128, 1)
    assert (m.classifier.in_features, m.classifier.out_features) == (512, 3)
    with pytest.raises(GpfmError, match="unknown MIL model"):
        build_mil("clam", 8, 2)


@pytest.mark.parametrize("name", list(MIL_MODELS))
def test_interface_mask_and_attention(name):
    torch.manual_seed(0)
    m = build_mil(name, 12, 3, hidden=32, attn_hidden=16).eval()
    bags = [torch.randn(n, 12) for n in (7, 11, 4)]
    one = torch.cat([m(b[None]) for b in bags])
    batched = forward_bags(m, bags)  # padded mini-batch (or one by one for TransMIL)
    assert one.shape == (3, 3)
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=1e-5)
    a = attention_scores(m, bags[1])
    assert a.shape == (11,) and torch.all(a >= 0) and abs(float(a.sum()) - 1) < 1e-5


def _planted(n_bags, rng, dim=12, shift=3.0, labels=None):
    direction = np.ones(dim) / np.sqrt(dim)
    bags, ys, where = [], [], []
    for i in range(n_bags):
        y = i % 2 if labels is None else labels[i]
        x = rng.normal(size=(int(rng.integers(20, 40)), dim)).astype(np.float32)
        pos = rng.choice(len(x), 3, replace=False) if y else np.array([], int)
        x[pos] += shift * direction
        bags.append(x), ys.append(y), where.append(pos)
    return bags, torch.tensor(ys), where


def test_attention_highlights_planted_tiles():
    rng = np.random.default_rng(0)
    bags, y, where = _planted(60, rng)
    torch.manual_seed(0)
    m = build_mil("abmil", 12, 2, hidden=32, attn_hidden=16)
    s = MILSettings(epochs=8, lr=2e-3, balanced_sampling=False)
    train_mil(m, bags, y, F.cross_entropy, s, seed=0, device="cpu")
    test_bags, _, test_where = _planted(20, np.random.default_rng(1))
    top_hits = [int(torch.argmax(attention_scores(m, torch.from_numpy(b)))) in w
                for b, w in zip(test_bags, test_where) if len(w)]
    assert np.mean(top_hits) >= 0.7  # the most attended tile is a planted one (chance: 0.1)


def test_early_stopping_rule():
    """Worse increments, equal-or-better resets and saves; stop at patience only after min_epochs."""
    es = EarlyStopping(patience=2, min_epochs=3, higher_is_better=False)
    saved = [es.step(e, v) for e, v in enumerate([1.0, 1.0, 1.2, 1.3, 0.9, 1.0, 1.1])]
    assert saved == [True, True, False, False, True, False, False]
    assert es.stop and es.best_epoch == 4
    es = EarlyStopping(patience=1, min_epochs=5)
    for e, v in enumerate([1.0, 2.0, 3.0]):
        es.step(e, v)
    assert not es.stop  # counter reached patience, but not past min_epochs
    es = EarlyStopping(patience=1, min_epochs=0, higher_is_better=True)
    assert es.step(0, float("nan")) and es.step(1, 0.5) and not es.step(2, float("nan"))


def test_best_validation_weights_are_restored():
    rng = np.random.default_rng(2)
    bags, y, _ = _planted(30, rng)
    m = build_mil("mean", 12, 2, hidden=16)
    s = MILSettings(epochs=6, patience=100, min_epochs=0, balanced_sampling=True)
    calls = []

    def score(logits, t):
        calls.append({k: v.clone() for k, v in m.state_dict().items()})
        return [0.1, 0.5, 0.9, 0.2, 0.3, 0.4][len(calls) - 1]

    info = train_mil(m, bags, y, F.cross_entropy, s, 0, "cpu", bags[:6], y[:6], score, higher_is_better=True,
                     strata=y.numpy())
    assert info["best_epoch"] == 2 and info["epochs_run"] == 6
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, calls[2][k])
