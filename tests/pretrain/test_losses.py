"""Each UKD loss against its formula on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpfm.io import GpfmError
from gpfm.pretrain import losses as L


def test_center_update_and_softmax_center():
    center = torch.tensor([1.0, 0.0, -1.0])
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0]])
    new = L.update_center(center, logits, momentum=0.9)
    assert torch.allclose(new, 0.9 * center + 0.1 * torch.tensor([4 / 3, 4 / 3, 10 / 3]))
    probs = L.softmax_center(logits, center, temp=0.5)
    expected = torch.softmax((logits - center) / 0.5, dim=-1)
    assert torch.allclose(probs, expected)
    # no rows (a step without masked tokens): centre unchanged
    assert torch.equal(L.update_center(center, logits[:0], 0.9), center)


def test_sinkhorn_knopp_marginals():
    torch.manual_seed(0)
    b, k = 12, 5
    logits = torch.randn(b, k) * 3
    q = L.sinkhorn_knopp(logits, temp=0.5, n_iters=3)
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)  # each sample: a distribution
    soft = torch.softmax(logits / 0.5, -1)
    spread = lambda p: float((p.sum(0) - b / k).abs().max())  # noqa: E731
    assert spread(q) < spread(soft) / 2  # 3 iterations already even out prototype usage
    q50 = L.sinkhorn_knopp(logits, temp=0.5, n_iters=50)
    assert torch.allclose(q50.sum(0), torch.full((k,), b / k), atol=1e-4)
    # huge logits do not overflow (global max subtracted)
    assert torch.isfinite(L.sinkhorn_knopp(logits * 1e3, temp=0.04)).all()


def _ce(t, s, temp):
    return -(t * torch.log_softmax(s / temp, -1)).sum(-1).mean()


def test_dino_loss_pairs_and_normalisation():
    torch.manual_seed(0)
    s = [torch.randn(4, 6) for _ in range(5)]  # 2 global + 3 local student crops
    t = [torch.softmax(torch.randn(4, 6), -1) for _ in range(2)]
    glob, loc = L.dino_loss(s, t, student_temp=0.1)
    n_pairs = 2 * 1 + 2 * 3
    exp_glob = (_ce(t[1], s[0], 0.1) + _ce(t[0], s[1], 0.1)) / n_pairs  # never a crop against itself
    exp_loc = sum(_ce(t[j], s[i], 0.1) for i in range(2, 5) for j in range(2)) / n_pairs
    assert torch.allclose(glob, exp_glob) and torch.allclose(loc, exp_loc)
    with pytest.raises(GpfmError):
        L.dino_loss(s[:1], t[:1], 0.1)


def test_ibot_loss_masked_tokens_only_weighted_per_image():
    torch.manual_seed(0)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # 3 images, 3 masked
    m = int(masks.sum())
    s, t = torch.randn(m, 5), torch.softmax(torch.randn(m, 5), -1)
    got = L.ibot_loss(s, t, masks, student_temp=0.1)
    ce = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    expected = ((ce[0] + ce[1]) / 2 + ce[2] / 1) / 3  # per-image mean over masked tokens, / all images
    assert torch.allclose(got, expected)
    # unmasked tokens are never looked at: the loss takes only the masked rows
    full = torch.randn(3, 4, 5)
    full2 = full.clone()
    full2[~masks] = 1e6  # garbage on unmasked positions
    assert torch.allclose(L.ibot_loss(full[masks], t, masks, 0.1), L.ibot_loss(full2[masks], t, masks, 0.1))


def test_koleo_formula_groups_and_zero_distance_guard():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    n = F.normalize(x, dim=-1)
    d01, d02 = (n[0] - n[1]).norm(), (n[0] - n[2]).norm()
    nn = torch.stack([d02, d02, d02])  # every point's nearest neighbour distance (2 is nearest to 0 and 1)
    assert torch.isclose(d02, (n[1] - n[2]).norm()) and d02 < d01
    assert torch.allclose(L.koleo_loss(x), -torch.log(nn).mean(), atol=1e-6)
    # groups score halves separately
    y = torch.randn(8, 4)
    assert torch.allclose(L.koleo_loss(y, group_size=4), (L.koleo_loss(y[:4]) + L.koleo_loss(y[4:])) / 2)
    # duplicates: finite value (-log eps) and finite gradient (R9)
    dup = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    v = L.koleo_loss(dup)
    v.backward()
    v = float(v.detach())
    assert math.isfinite(v) and torch.isfinite(dup.grad).all()
    assert v < -math.log(1e-8) + 1e-3
    with pytest.raises(GpfmError):
        L.koleo_loss(torch.randn(3, 4), group_size=1)


def test_expert_cls_loss_is_one_minus_mean_cosine():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert torch.isclose(L.cosine_loss(p, t), torch.tensor(1 - (math.sqrt(0.5) + 1.0) / 2))


def test_resample_tokens_is_bicubic_on_the_grid():
    torch.manual_seed(0)
    tok = torch.randn(2, 3 * 4, 5)  # a 3x4 grid
    out = L.resample_tokens(tok, (3, 4), (6, 8))
    grid = tok.transpose(1, 2).reshape(2, 5, 3, 4)
    ref = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False).reshape(2, 5, 48).transpose(1, 2)
    assert out.shape == (2, 48, 5) and torch.allclose(out, ref)
    assert L.resample_tokens(tok, (3, 4), (3, 4)) is tok
    # a constant grid stays constant; a linear ramp stays monotone
    const = torch.full((1, 4, 2), 3.0)
    assert torch.allclose(L.resample_tokens(const, (2, 2), (5, 5)), torch.full((1, 25, 2), 3.0))
    with pytest.raises(ValueError):
        L.resample_tokens(tok, (4, 4), (6, 6))


def test_expert_patch_loss_formula():
    torch.manual_seed(0)
    target = torch.randn(2, 4, 3)  # expert grid 2x2
    pred = torch.randn(2, 9, 3)  # student grid 3x3
    got = L.expert_patch_loss(pred, target, (3, 3), (2, 2))
    t = L.resample_tokens(target, (2, 2), (3, 3))
    cos = F.cosine_similarity(pred, t, dim=-1).mean()
    expected = 0.9 * (1 - cos) + 0.1 * F.smooth_l1_loss(pred, t, beta=1.0)
    assert torch.allclose(got, expected)
    assert float(L.expert_patch_loss(t, target, (3, 3), (2, 2))) < 1e-6  # perfect prediction -> 0


def test_entropy_monitor():
    assert torch.isclose(L.entropy(torch.full((3, 4), 0.25)), torch.tensor(math.log(4)))
    assert float(L.entropy(torch.eye(3))) < 1e-6
