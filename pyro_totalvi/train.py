"""Minibatch SVI for :class:`~pyro_totalvi.model.TotalVIModule`.

Each step is ``Trace_ELBO`` (or ``TraceEnum_ELBO`` when ``v`` is enumerated) on one minibatch,
scaled by the plate to the full training set, divided by the number of training cells so that the
optimiser sees a per-cell loss (as scvi-tools; Adam's ``eps=0.01`` assumes that scale).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from .data import CiteData, Minibatch
from .model import TotalVIModule

__all__ = ["train", "evaluate", "TrainingDivergedError", "default_max_epochs", "make_elbo"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the module holds the last good parameters."""


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: about 400 epochs for 20,000 cells, fewer for more cells."""
    return int(max(1, min(round(20000 / max(n_cells, 1) * 400), 400)))


def make_elbo(module: TotalVIModule):
    """The Pyro ELBO matching the module's treatment of ``v``."""
    if module.protein_mixture == "enumerate":
        return TraceEnum_ELBO(max_plate_nesting=2)
    return Trace_ELBO()


@contextlib.contextmanager
def _fast_steps(module: TotalVIModule):
    """Skip per-step work a training loop does not need; restored on exit, error or not.

    Pyro's argument checks of every distribution at every step cost more than the NB likelihood
    (the tests check shapes once, with validation on), and registering the networks with the
    param store is unnecessary when a torch optimiser holds ``module.parameters()``.
    """
    module.register_with_pyro = False
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        module.register_with_pyro = True


def _batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(indices) if rng is not None else indices
    n = len(order)
    for start in range(0, n, batch_size):
        chunk = order[start : start + batch_size]
        # BatchNorm needs at least 2 cells; a 1-2 cell tail is noise anyway (scvi-tools drops it).
        if len(chunk) < 3 and n >= 3:
            return
        yield chunk


@torch.no_grad()
def evaluate(module: TotalVIModule, data: CiteData, indices: np.ndarray, batch_size: int = 1024):
    """Mean per-cell ELBO terms on ``indices``, full KL weight, networks in eval mode.

    The reconstruction term is a one-sample Monte Carlo estimate under q (with ``v`` summed out);
    the KL terms are analytic, as in scvi-tools, so the two ELBOs compare directly.

    Returns
    -------
    dict with ``elbo`` (negative ELBO per cell), ``reconstruction_loss`` and ``kl_local``.
    """
    was_training = module.training
    module.eval()
    recon = kl = 0.0
    mixture = module.protein_mixture
    module.protein_mixture = "marginal"  # same ELBO, and no enumeration dimension to handle
    try:
        for start in range(0, len(indices), batch_size):
            mb = data.minibatch(indices[start : start + batch_size])
            guide_tr = poutine.trace(module.guide).get_trace(*mb.args())
            model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(
                *mb.args()
            )
            for name in ("x", "y"):
                site = model_tr.nodes[name]
                lp = site["fn"].log_prob(site["value"])
                if site["mask"] is not None:
                    lp = lp * site["mask"]
                recon -= lp.sum().item()
            for name in ("z", "l", "beta"):
                if name not in guide_tr.nodes:
                    continue
                q, p = guide_tr.nodes[name]["fn"], model_tr.nodes[name]["fn"]
                k = kl_divergence(q, p)
                mask = model_tr.nodes[name]["mask"]
                if mask is not None:
                    k = k * mask
                kl += k.sum().item()
    finally:
        module.protein_mixture = mixture
        module.train(was_training)
    n = max(len(indices), 1)
    return {"elbo": (recon + kl) / n, "reconstruction_loss": recon / n, "kl_local": kl / n}


def train(
    module: TotalVIModule,
    data: CiteData,
    max_epochs: int | None = None,
    lr: float = 4e-3,
    weight_decay: float = 1e-6,
    eps: float = 0.01,
    batch_size: int = 256,
    train_size: float = 0.9,
    early_stopping: bool = True,
    early_stopping_patience: int = 45,
    reduce_lr_on_plateau: bool = True,
    lr_patience: int = 30,
    lr_factor: float = 0.6,
    n_steps_kl_warmup: int | None = None,
    seed: int = 0,
    progress_bar: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """Train ``module`` on ``data`` by minibatch SVI.

    Parameters
    ----------
    max_epochs
        Default :func:`default_max_epochs`.
    lr, weight_decay, eps
        Adam settings (scvi-tools' TOTALVI defaults).
    batch_size, train_size
        Minibatch size and the fraction of cells used for training (the rest validate).
    early_stopping, early_stopping_patience
        Stop when the validation ELBO has not improved for this many epochs.
    reduce_lr_on_plateau, lr_patience, lr_factor
        Multiply the learning rate by ``lr_factor`` after ``lr_patience`` epochs without
        improvement of the validation ELBO.
    n_steps_kl_warmup
        Linear KL warm-up on ``z`` and ``beta`` over this many steps; default ``0.75 * n_cells``.
    seed
        Seeds the split, the minibatch order and every draw: same seed, same result.

    Returns
    -------
    history
        One row per epoch: ``elbo_train``, ``elbo_validation``, ``reconstruction_loss_*``,
        ``kl_local_*`` (per cell, full KL weight), ``loss_train`` (the optimised objective with
        the warm-up weight), ``kl_weight`` and ``lr``.
    split
        ``{"train": indices, "validation": indices}``.
    """
    n = data.n_obs
    max_epochs = default_max_epochs(n) if max_epochs is None else int(max_epochs)
    n_steps_kl_warmup = int(0.75 * n) if n_steps_kl_warmup is None else n_steps_kl_warmup
    rng = np.random.default_rng(seed)
    pyro.set_rng_seed(seed)
    perm = rng.permutation(n)
    n_train = n if train_size >= 1.0 else max(1, min(n - 1, int(math.ceil(train_size * n))))
    train_idx, val_idx = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    # A fixed sample of training cells, as large as the validation set, tracks elbo_train with
    # the full KL weight at a fraction of an epoch's cost.
    train_probe = np.sort(rng.choice(train_idx, min(len(train_idx), max(len(val_idx), 256)),
                                     replace=False))

    elbo = make_elbo(module)
    # fused: one kernel for all parameters instead of a Python loop over 40 tensors.
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay, eps=eps,
                                 fused=True)
    scheduler = None
    if reduce_lr_on_plateau and len(val_idx):
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=lr_factor, patience=lr_patience, threshold=0.0,
            threshold_mode="abs",
        )
    history = []
    best, best_epoch, step = math.inf, 0, 0
    last_good = {k: v.detach().clone() for k, v in module.state_dict().items()}
    bar = tqdm(range(max_epochs), desc="Training", disable=not progress_bar, unit="epoch")
    for epoch in bar:
        module.train()
        losses = []
        with _fast_steps(module):
            for b, chunk in enumerate(_batches(train_idx, batch_size, rng)):
                mb: Minibatch = data.minibatch(chunk)
                # Pyro's poutine.scale needs a weight > 0: the first step uses the second's.
                kl_weight = min(1.0, max(step, 1) / n_steps_kl_warmup) if n_steps_kl_warmup else 1.0
                loss = elbo.differentiable_loss(
                    module.model, module.guide, *mb.args(), idx=mb.idx, n_obs=n_train,
                    kl_weight=kl_weight,
                ) / n_train
                if not torch.isfinite(loss):
                    module.load_state_dict(last_good)
                    raise TrainingDivergedError(
                        f"loss became {loss.item()} at epoch {epoch}, step {b} (global step "
                        f"{step}); the model keeps the parameters of the end of the last "
                        "completed epoch. Try a lower lr, check the input for outliers, or use "
                        "a larger batch_size."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
        # Cheap enough once per epoch; a divergence within an epoch rolls back to here.
        last_good = {k: v.detach().clone() for k, v in module.state_dict().items()}
        row = {"epoch": epoch, "loss_train": float(np.mean(losses)) if losses else math.nan,
               "kl_weight": kl_weight if losses else math.nan,
               "lr": optimizer.param_groups[0]["lr"]}
        for name, idx in (("train", train_probe), ("validation", val_idx)):
            if len(idx):
                for key, value in evaluate(module, data, idx).items():
                    row[f"{key}_{name}"] = value
        history.append(row)
        monitor = row.get("elbo_validation", row.get("elbo_train"))
        bar.set_postfix(elbo_train=f"{row.get('elbo_train', math.nan):.1f}",
                        elbo_val=f"{row.get('elbo_validation', math.nan):.1f}")
        if scheduler is not None:
            scheduler.step(monitor)
        if monitor < best:
            best, best_epoch = monitor, epoch
        elif early_stopping and len(val_idx) and epoch - best_epoch >= early_stopping_patience:
            break
    module.eval()
    return pd.DataFrame(history).set_index("epoch"), {"train": train_idx, "validation": val_idx}
