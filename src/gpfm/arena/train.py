"""Training loop shared by the slide-level tasks: MIL heads on feature bags with the GPFM protocol.

Adam (lr 2e-4, weight decay 1e-4), one slide per step (or padded mini-batches), optional class-balanced sampling
(each epoch draws len(train) slides with replacement, weight 1 / class size, as CLAM's sampler), up to 100 epochs,
early stopping on a validation criterion with the paper's rule (`EarlyStopping`), best-validation weights
restored before testing. All of it is configurable through `MILSettings` (a task spec's `settings:`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpfm.arena.mil import MILModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class MILSettings:
    """Model and optimisation settings of a slide-level task (defaults: the GPFM protocol)."""

    model: str = "abmil"  # abmil | gated_abmil | transmil | mean | max
    hidden: int = 512
    attn_hidden: int = 128
    dropout: float = 0.25
    epochs: int = 100
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 1  # slides per step; > 1 pads bags into mini-batches (faster, not the paper's setting)
    balanced_sampling: bool = True
    early_stopping: bool = True
    patience: int = 20
    min_epochs: int = 50  # stop only after this epoch (0-based, as the paper's stop_epoch)
    max_tiles: int = 0  # > 0: train on a random subset of this many tiles per bag and step (0 = all tiles)
    n_boot: int = 1000  # bootstrap resamples of the test predictions


class EarlyStopping:
    """The paper's rule: a worse epoch increments the counter, an equal or better one resets it and is saved;
    stop once the counter reaches `patience` and the epoch is past `min_epochs`."""

    def __init__(self, patience: int = 20, min_epochs: int = 50, higher_is_better: bool = False):
        self.patience, self.min_epochs, self.sign = patience, min_epochs, 1.0 if higher_is_better else -1.0
        self.best: float | None = None
        self.best_epoch = -1
        self.counter = 0
        self.stop = False

    def step(self, epoch: int, value: float) -> bool:
        """Record one epoch's validation value; True when it is the new best (save the weights)."""
        score = self.sign * value if np.isfinite(value) else -np.inf  # NaN (undefined) counts as worst
        if self.best is not None and not score >= self.best:
            self.counter += 1
            if self.counter >= self.patience and epoch > self.min_epochs:
                self.stop = True
            return False
        self.best, self.best_epoch, self.counter = score, epoch, 0
        return True


def _to_tensor(bag: np.ndarray, device: str, max_tiles: int, rng: np.random.Generator | None) -> torch.Tensor:
    if max_tiles and rng is not None and len(bag) > max_tiles:
        bag = bag[np.sort(rng.choice(len(bag), max_tiles, replace=False))]
    return torch.from_numpy(np.ascontiguousarray(bag)).to(device=device, dtype=torch.float32)


def forward_bags(model: MILModel, bags: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits (B, n_out) of several bags: one padded batch when the model supports masks, else one by one."""
    if len(bags) == 1 or not model.supports_mask:
        return torch.cat([model(b[None]) for b in bags])
    n = max(len(b) for b in bags)
    x = bags[0].new_zeros(len(bags), n, bags[0].shape[1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool, device=x.device)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return model(x, mask)


@torch.no_grad()
def predict(model: MILModel, bags: Sequence[np.ndarray], device: str) -> torch.Tensor:
    """Eval-mode logits (n, n_out) over full bags, one bag at a time (exact; bags may be large)."""
    model.eval()
    if not bags:
        return torch.empty(0)
    return torch.cat([model(_to_tensor(b, device, 0, None)[None]).float().cpu() for b in bags])


def balanced_weights(strata: Sequence) -> np.ndarray:
    """Sampling weights 1 / (size of the sample's class), normalised."""
    _, inv, counts = np.unique(np.asarray(strata).astype(str), return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    return w / w.sum()


def train_mil(model: MILModel, bags: Sequence[np.ndarray], targets: torch.Tensor, loss_fn: LossFn,
              settings: MILSettings, seed: int, device: str, val_bags: Sequence[np.ndarray] = (),
              val_targets: torch.Tensor | None = None, val_score: ScoreFn | None = None,
              higher_is_better: bool = False, strata: Sequence | None = None) -> dict:
    """Train `model` in place; restore the best-validation weights. Returns a history/info dict.

    `loss_fn(logits, targets)` is the training loss; the early-stopping value is `val_score(val_logits,
    val_targets)` (default: the loss on the whole validation set, lower is better).
    """
    rng = np.random.default_rng([seed, 7])
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    weights = balanced_weights(strata) if settings.balanced_sampling and strata is not None else None
    score_fn = val_score or (lambda lo, t: float(loss_fn(lo, t)))
    stopper = EarlyStopping(settings.patience, settings.min_epochs, higher_is_better if val_score else False)
    best = copy.deepcopy(model.state_dict())
    history = []
    n = len(bags)
    for epoch in range(settings.epochs):
        model.train()
        order = rng.choice(n, n, replace=True, p=weights) if weights is not None else rng.permutation(n)
        total = 0.0
        for start in range(0, n, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            batch = [_to_tensor(bags[i], device, settings.max_tiles, rng) for i in idx]
            loss = loss_fn(forward_bags(model, batch), targets[torch.as_tensor(idx)].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "train_loss": total / max(n, 1)}
        if len(val_bags) and val_targets is not None:
            logits = predict(model, val_bags, device)
            row["val"] = score_fn(logits, val_targets)
            if stopper.step(epoch, row["val"]):
                best = copy.deepcopy(model.state_dict())
        history.append(row)
        if settings.early_stopping and stopper.stop:
            break
    if len(val_bags) and val_targets is not None:
        model.load_state_dict(best)
    return {"epochs_run": len(history), "best_epoch": stopper.best_epoch if len(val_bags) else len(history) - 1,
            "history": history}
