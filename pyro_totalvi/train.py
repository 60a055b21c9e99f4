"""Minibatch SVI for :class:`~pyro_totalvi.model.TotalVIModule`.

Each step is ``Trace_ELBO`` (or ``TraceEnum_ELBO`` when ``v`` is enumerated) on one minibatch,
scaled by the plate to the full training set, divided by the number of training cells so that the
optimiser sees a per-cell loss (as scvi-tools; Adam's ``eps=0.01`` assumes that scale).

:func:`train` runs a :class:`Trainer`, whose methods are the named steps of a run: the split,
the optimiser, resuming, one epoch of steps, the divergence check, the epoch's evaluation, the
learning-rate schedule and early stopping, and the checkpoint. Evaluation lives in
:mod:`pyro_totalvi.scoring`, checkpoint files in :mod:`pyro_totalvi.checkpoint`, devices in
:mod:`pyro_totalvi.device`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from tqdm.auto import tqdm

from . import distributed as ddp
from .adversarial import AdversarialClassifier, watch_latent
from .checkpoint import (
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    check_resumable,
    data_fingerprint,
    get_rng_states,
    load_checkpoint,
    module_config,
    set_rng_states,
    write_checkpoint,
)
from .data import CiteData, TotalVIDataError
from .device import module_device, resolve_device
from .model import MAX_PLATE_NESTING, TotalVIModule
from .rng import rng_scope, seed_torch
from .scoring import droplet_elbo, elbo_terms, evaluate

__all__ = [
    "train",
    "Trainer",
    "TrainingPlan",
    "TrainingDivergedError",
    "default_max_epochs",
    "make_elbo",
    "make_adam",
    # kept importable from here for existing code: they live in checkpoint, device and scoring
    "CHECKPOINT_NAME",
    "load_checkpoint",
    "resolve_device",
    "evaluate",
    "elbo_terms",
]

logger = logging.getLogger("pyro_totalvi")

#: Losses are checked for NaN every this many steps (not every step: reading a loss makes the
#: CPU wait for a GPU), so a long epoch stops soon after a divergence.
CHECK_EVERY = 64
#: Training cells evaluated after every epoch for ``elbo_train`` (a fixed sample).
PROBE_CELLS = 256


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the module holds the last good parameters."""


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: about 400 epochs for 20,000 cells, fewer for more cells."""
    return int(max(1, min(round(20000 / max(n_cells, 1) * 400), 400)))


def make_elbo(module: TotalVIModule):
    """The Pyro ELBO for the module: ``TraceEnum_ELBO`` when it enumerates a site (``v``, or an
    extension's label), else ``Trace_ELBO``."""
    if module.enumerates:
        return TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    return Trace_ELBO()


def make_adam(params: list, optimizer: str = "Adam", **kwargs) -> torch.optim.Optimizer:
    """Adam (or ``optimizer="AdamW"``, decoupled weight decay, as scvi-tools' choice), fused
    where this torch has a fused kernel for the parameters' device (one kernel for all
    parameters instead of a loop over 40 tensors: CUDA, and the CPU from torch 2.4 on), else the
    multi-tensor ``foreach`` implementation."""
    if optimizer not in ("Adam", "AdamW"):
        raise ValueError(f"optimizer must be 'Adam' or 'AdamW', got {optimizer!r}")
    cls = torch.optim.AdamW if optimizer == "AdamW" else torch.optim.Adam
    try:
        return cls(params, fused=True, **kwargs)
    except RuntimeError:  # "`fused=True` requires all the params to be ... supported devices"
        return cls(params, foreach=True, **kwargs)


def _batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator | None,
             block: int = 1, rank: int = 0, world: int = 1):
    """Shuffled minibatches of ``indices``.

    ``block > 1`` shuffles runs of ``block`` consecutive (sorted) indices instead of single cells:
    for data read from disk a minibatch is then a few contiguous reads, not ``batch_size``
    random ones. Cells are still visited once per epoch; only neighbours share minibatches.

    With ``world > 1`` processes (all drawing the same order from identically seeded ``rng``),
    the order is cut into global minibatches of ``world * batch_size`` cells and process ``rank``
    gets the ``rank``-th contiguous part of each: the processes together see exactly the
    minibatches of one process with ``world * batch_size`` (but a last one too small to give
    every process 3 cells is dropped), and every process gets the same number of minibatches (so
    no collective waits for a process that has run out).
    """
    if rng is None:
        order = indices
    elif block > 1:
        runs = np.array_split(indices, max(1, -(-len(indices) // block)))
        order = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
    else:
        order = rng.permutation(indices)
    n = len(order)
    for start in range(0, n, batch_size * world):
        chunk = order[start : start + batch_size * world]
        # BatchNorm needs at least 2 cells; a 1-2 cell tail is noise anyway (scvi-tools drops it).
        # The first chunk is always kept (train() guarantees it has >= 2 cells per process), and
        # with batch_size=2 only a 1-cell tail is dropped. len(chunk) // world is the smallest
        # process's part: every process takes the same decision.
        if start > 0 and len(chunk) // world < min(3, batch_size):
            return
        yield chunk if world == 1 else ddp.shard(chunk, rank, world)


#: Metrics that ``lr_scheduler_metric`` and ``early_stopping_monitor`` may name (scvi-tools').
MONITORS = ("elbo_validation", "reconstruction_loss_validation", "kl_local_validation")


def _check_external_indexing(split, n_obs: int) -> tuple[np.ndarray, ...] | None:
    """``external_indexing`` (train, validation[, test] indices) as three int arrays; raises
    on indices out of range, overlapping sets or fewer than 2 training cells."""
    if split is None:
        return None
    parts = list(split) + [[]] * (3 - len(split))
    if len(parts) != 3:
        raise ValueError("external_indexing must be [train, validation, test] indices "
                         f"(validation and test may be empty); got {len(split)} arrays")
    arrays = []
    for name, part in zip(("train", "validation", "test"), parts):
        a = np.asarray(part if part is not None else [])
        a = np.flatnonzero(a) if a.dtype == bool else a.astype(np.int64).ravel()
        if len(a) and (a.min() < 0 or a.max() >= n_obs or len(np.unique(a)) != len(a)):
            raise ValueError(f"external_indexing {name} indices must be distinct cells in "
                             f"[0, {n_obs})")
        arrays.append(a)
    for (i, a), (j, b) in ((x, y) for x in enumerate(arrays) for y in enumerate(arrays) if x < y):
        if len(np.intersect1d(a, b)):
            raise ValueError(f"external_indexing sets {i} and {j} share cells")
    if len(arrays[0]) < 2:
        raise TotalVIDataError("external_indexing must give at least 2 training cells")
    return tuple(arrays)


def _fingerprint(split) -> str | None:
    if split is None:
        return None
    h = hashlib.blake2b(digest_size=8)
    for a in split:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


@dataclass
class TrainingPlan:
    """Settings of a training run that change its trajectory (see :func:`train`).

    Besides :func:`train`'s arguments, with scvi-tools' names and defaults: ``optimizer``
    (``"Adam"`` or ``"AdamW"``), ``lr_threshold`` and ``lr_min`` (of the plateau schedule),
    ``lr_scheduler_metric`` and ``early_stopping_monitor`` (one of :data:`MONITORS`),
    ``early_stopping_min_delta``, and ``min_kl_weight``, ``max_kl_weight`` (the warm-up's ends).
    """

    seed: int = 0
    lr: float = 4e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    batch_size: int = 256
    train_size: float | None = 0.9
    early_stopping: bool = True
    early_stopping_patience: int = 45
    reduce_lr_on_plateau: bool = True
    lr_patience: int = 30
    lr_factor: float = 0.6
    n_steps_kl_warmup: int | None = None
    adversarial_classifier: bool = False
    world_size: int = 1
    validation_size: float | None = None
    shuffle_set_split: bool = True
    #: fingerprint of ``external_indexing`` (the split itself is in the checkpoint)
    external_split: str | None = None
    check_val_every_n_epoch: int | None = 1
    n_epochs_kl_warmup: int | None = None
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    optimizer: str = "Adam"
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_min_delta: float = 0.0

    def validate(self, n_obs: int) -> None:
        """Raise on settings that cannot train ``n_obs`` cells; fill in the defaults that
        ``None`` stands for (train_size 0.9, a validation every epoch, the warm-up length)."""
        self.train_size = 0.9 if self.train_size is None else self.train_size
        self.check_val_every_n_epoch = self.check_val_every_n_epoch or 1
        if n_obs < 2:
            raise TotalVIDataError(
                f"training needs at least 2 cells (BatchNorm normalises over a minibatch); the "
                f"data has {n_obs}.")
        if not 0.0 < self.train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1], got {self.train_size}")
        if self.validation_size is not None and not (
                0.0 <= self.validation_size < 1.0
                and self.train_size + self.validation_size <= 1.0 + 1e-12):
            raise ValueError(f"validation_size must be in [0, 1) with train_size + "
                             f"validation_size <= 1, got {self.validation_size} (train_size "
                             f"{self.train_size})")
        if int(self.batch_size) < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}")
        if int(self.check_val_every_n_epoch) < 1:
            raise ValueError(f"check_val_every_n_epoch must be at least 1, got "
                             f"{self.check_val_every_n_epoch}")
        if self.optimizer not in ("Adam", "AdamW"):
            raise ValueError(f"optimizer must be 'Adam' or 'AdamW', got {self.optimizer!r}")
        for name in ("lr_scheduler_metric", "early_stopping_monitor"):
            if getattr(self, name) not in MONITORS:
                raise ValueError(f"{name} must be one of {MONITORS}, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_kl_weight <= self.max_kl_weight or self.max_kl_weight <= 0:
            raise ValueError(f"need 0 <= min_kl_weight <= max_kl_weight and max_kl_weight > 0, got "
                             f"{self.min_kl_weight} and {self.max_kl_weight}")
        self.batch_size = int(self.batch_size)
        self.check_val_every_n_epoch = int(self.check_val_every_n_epoch)
        self.lr, self.weight_decay, self.eps = map(float, (self.lr, self.weight_decay, self.eps))
        self.train_size, self.lr_factor = float(self.train_size), float(self.lr_factor)
        if self.n_steps_kl_warmup is None:
            self.n_steps_kl_warmup = int(0.75 * n_obs)

    def kl_weight(self, step: int, epoch: int = 0) -> float:
        """Linear warm-up from ``min_kl_weight`` to ``max_kl_weight`` over ``n_epochs_kl_warmup``
        epochs if set, else over ``n_steps_kl_warmup`` steps (scvi-tools' rule). Pyro's
        ``poutine.scale`` needs a weight > 0: where the schedule starts at 0, step 0 (epoch 0)
        uses step 1's (epoch 1's) weight."""
        top, low = self.max_kl_weight, self.min_kl_weight
        if self.n_epochs_kl_warmup:
            if epoch >= self.n_epochs_kl_warmup:
                return top
            position = (epoch if epoch or low else 1) / self.n_epochs_kl_warmup
        elif self.n_steps_kl_warmup:
            if step >= self.n_steps_kl_warmup:
                return top
            position = (step if step or low else 1) / self.n_steps_kl_warmup
        else:
            return top
        return min(top, low + (top - low) * position)

    def validates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (from 0) ends with a validation (Lightning's cadence)."""
        return (epoch + 1) % self.check_val_every_n_epoch == 0


#: Settings added after checkpoints were first written, with the value those checkpoints used.
_SETTINGS_BEFORE_16 = {k: v for k, v in asdict(TrainingPlan()).items() if k in (
    "validation_size", "shuffle_set_split", "external_split", "check_val_every_n_epoch",
    "n_epochs_kl_warmup", "max_kl_weight", "min_kl_weight", "optimizer", "lr_threshold", "lr_min",
    "lr_scheduler_metric", "early_stopping_monitor", "early_stopping_min_delta")}


class Trainer:
    """One training run of ``module`` on ``data`` (see :func:`train` for the arguments)."""

    def __init__(self, module: TotalVIModule, data: CiteData, plan: TrainingPlan,
                 max_epochs: int | None = None, progress_bar: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10,
                 resume: bool = False, strategy: str | None = None,
                 external_indexing: list | None = None):
        plan.validate(data.n_obs)
        self.external = _check_external_indexing(external_indexing, data.n_obs)
        plan.external_split = _fingerprint(self.external)
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir that the interrupted run "
                             "wrote to")
        if strategy not in (None, "single", "ddp"):
            raise ValueError(f"strategy must be None, 'single' or 'ddp', got {strategy!r}")
        self.module, self.data, self.plan = module, data, plan
        self.rank, self.world = 0, 1
        if strategy == "ddp":
            ddp.init_distributed()  # no-op if a process group exists; a clear error otherwise
            self.rank, self.world = ddp.get_rank(), ddp.get_world_size()
        plan.world_size = self.world
        if plan.adversarial_classifier and module.n_batches < 2:
            logger.warning("adversarial_classifier=True but the data have one batch: there is "
                           "nothing to mix, so no classifier is trained.")
            plan.adversarial_classifier = False
        self.max_epochs = default_max_epochs(data.n_obs) if max_epochs is None else int(max_epochs)
        self.progress_bar = progress_bar
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        # The split and the minibatch order; draws inside the model and guide come from the
        # global generators, seeded in run() and restored afterwards (see pyro_totalvi.rng).
        self.rng = np.random.default_rng(plan.seed)
        self.resumed_rng: dict | None = None
        self.adversary: AdversarialClassifier | None = None  # made in run(), from seeded draws
        self.resumed_adversary: dict | None = None
        self._split()
        self._make_optimizer()
        self.history: list[dict] = []
        self.best, self.best_epoch, self.step, self.epoch = math.inf, 0, 0, 0
        self.start_epoch, self.stopped = 0, False
        self.last_good = self._snapshot()
        if self.checkpoint_dir is not None:
            self.fingerprints = (data_fingerprint(data), module_config(module))
        if resume:
            self._resume()

    # -- set-up ------------------------------------------------------------------------------------
    def _split(self) -> None:
        """Training / validation / test cells, and a fixed probe of training cells for
        ``elbo_train``.

        ``ceil(train_size * n)`` cells train and ``floor(validation_size * n)`` validate (the
        rest when ``validation_size`` is ``None``), as scvi-tools' ``DataSplitter``; the
        remaining cells are the test set. ``shuffle_set_split=False`` takes them in data order
        (validation first, then training, then test, as scvi-tools).
        """
        n, plan = self.data.n_obs, self.plan
        perm = self.rng.permutation(n)  # drawn either way: the probe's draw follows the same
        # At least 2 training cells (BatchNorm); tiny data sets give up validation first.
        n_train = n if plan.train_size >= 1.0 else max(2, min(n - 1, math.ceil(plan.train_size * n)))
        n_val = (n - n_train if plan.validation_size is None
                 else min(n - n_train, math.floor(plan.validation_size * n)))
        if self.external is not None:
            self.train_idx, self.val_idx, self.test_idx = (np.sort(a) for a in self.external)
            n_train = len(self.train_idx)
        elif plan.shuffle_set_split:
            self.train_idx, self.val_idx, self.test_idx = (
                np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_val]),
                np.sort(perm[n_train + n_val:]))
        else:
            order = np.arange(n)
            self.val_idx, self.train_idx, self.test_idx = (
                order[:n_val], order[n_val:n_val + n_train], order[n_val + n_train:])
        # A fixed sample of training cells: elbo_train with the full KL weight, in eval mode as
        # the validation ELBO, at a small fraction of an epoch's cost.
        self.train_probe = np.sort(self.rng.choice(self.train_idx, min(n_train, PROBE_CELLS),
                                                   replace=False))
        if self.world > 1:
            if n_train < 2 * self.world:
                raise TotalVIDataError(
                    f"{self.world} processes need at least {2 * self.world} training cells (2 per "
                    f"process for BatchNorm); there are {n_train}. Use fewer processes.")
            # Initial weights, empirical background prior, library-size priors: rank 0's.
            ddp.broadcast_module(self.module)

    def _make_optimizer(self) -> None:
        """Adam over the parameters with ``requires_grad``.

        A module may carry ``grad_masks`` (parameter name -> bool tensor, ``True`` = trainable
        entry; set by reference mapping, :mod:`pyro_totalvi.query`). Those parameters form a
        second group without Adam's weight decay: :meth:`_mask_gradients` zeroes their frozen
        entries' gradients and adds the weight decay to the trainable entries only, so Adam's
        moments of a frozen entry stay 0 and it never moves.
        """
        plan = self.plan
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        masks = getattr(self.module, "grad_masks", None) or {}
        self.grad_masks = [(p, masks[n].to(p.device)) for n, p in named if n in masks]
        masked = {id(p) for p, _ in self.grad_masks}
        groups = [{"params": [p for p in self.params if id(p) not in masked]},
                  {"params": [p for p, _ in self.grad_masks], "weight_decay": 0.0}]
        self.optimizer = make_adam([g for g in groups if g["params"]], plan.optimizer,
                                   lr=plan.lr, weight_decay=plan.weight_decay, eps=plan.eps)
        self.scheduler = None
        if plan.reduce_lr_on_plateau and len(self.val_idx):
            # The schedule steps at each validation; its patience counts epochs, as with a
            # validation every epoch (lr_patience epochs = that many / k validations).
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=plan.lr_factor,
                patience=math.ceil(plan.lr_patience / plan.check_val_every_n_epoch),
                threshold=plan.lr_threshold, threshold_mode="abs", min_lr=plan.lr_min)

    def _make_adversary(self) -> None:
        """The adversarial batch classifier (see :mod:`pyro_totalvi.adversarial`)."""
        self.adversary = AdversarialClassifier(
            self.module.n_latent, self.module.n_batches, self.plan.weight_decay,
            module_device(self.module))
        if self.world > 1:
            ddp.broadcast_module(self.adversary.classifier)  # rank 0's initial weights
        if self.resumed_adversary is not None:
            self.adversary.load_state_dict(self.resumed_adversary)

    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints -------------------------------------------------------------------------------
    def _settings(self) -> dict:
        """Everything that changes the trajectory; max_epochs does not (until it ends it)."""
        return asdict(self.plan)

    def _read_checkpoint(self) -> dict:
        if self.world == 1:
            return load_checkpoint(self.checkpoint_dir)
        # Rank 0 reads the file (other nodes need not see it) and sends it, or its error, to all.
        try:
            state = load_checkpoint(self.checkpoint_dir) if self.rank == 0 else None
        except (OSError, ValueError) as err:
            state = err
        state = ddp.broadcast_object(state)
        if isinstance(state, BaseException):
            raise state
        return state

    def _resume(self) -> None:
        state = self._read_checkpoint()
        # a checkpoint written before a setting existed was written with its default
        state["settings"] = {**_SETTINGS_BEFORE_16, **state["settings"]}
        check_resumable(state, self.checkpoint_dir / CHECKPOINT_NAME, *self.fingerprints,
                        self._settings())
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.last_good, self.history = state["last_good"], list(state["history"])
        self.best, self.best_epoch, self.step = state["best"], state["best_epoch"], state["step"]
        self.start_epoch, self.stopped = state["epoch"], state["stopped_early"]
        split = state["split"]
        self.train_idx, self.val_idx, self.train_probe = (
            split[k].numpy() for k in ("train", "validation", "train_probe"))
        self.test_idx = split["test"].numpy() if "test" in split else np.zeros(0, np.int64)
        self.resumed_rng = state["rng"]  # set in run(): the global states only inside its scope
        self.resumed_adversary = state.get("adversary")

    def _checkpoint(self, epochs_done: int) -> None:
        data_fp, module_cfg = self.fingerprints
        write_checkpoint(self.checkpoint_dir, {
            "format_version": CHECKPOINT_VERSION,
            "data": data_fp, "module_config": module_cfg, "settings": self._settings(),
            "epoch": epochs_done, "step": self.step, "best": self.best,
            "best_epoch": self.best_epoch, "stopped_early": self.stopped,
            "history": self.history,
            # At the end of an epoch the module's state *is* last_good: one dict, stored once.
            "module": self.last_good, "last_good": self.last_good,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": get_rng_states(self.rng),
            "adversary": None if self.adversary is None else self.adversary.state_dict(),
            "split": {"train": torch.from_numpy(self.train_idx),
                      "validation": torch.from_numpy(self.val_idx),
                      "test": torch.from_numpy(self.test_idx),
                      "train_probe": torch.from_numpy(self.train_probe)},
        })

    # -- one epoch ---------------------------------------------------------------------------------
    def _minibatches(self):
        block = 32 if getattr(self.data, "backed", False) else 1  # contiguous disk reads
        device = module_device(self.module)
        droplets = self._droplets()
        for chunk in _batches(self.train_idx, self.plan.batch_size, self.rng, block, self.rank,
                              self.world):
            mb = self.data.minibatch(chunk, device)
            if droplets is not None:
                # A fresh random subsample of the droplets at every step, scaled by their plate
                # (n_droplets / size): the step's loss stays an unbiased estimate of the ELBO.
                size = min(droplets.n_obs, self.plan.batch_size)
                mb.extras["droplets"] = droplets.minibatch(
                    self.rng.choice(droplets.n_obs, size, replace=False), device)
            yield mb

    def _droplets(self):
        """The empty droplets the module models (``None`` when it models none)."""
        if not getattr(self.module, "empty_droplets", False):
            return None
        droplets = getattr(self.data, "droplets", None)
        if droplets is None:
            raise TotalVIDataError("the module models empty droplets (empty_droplets=True) but "
                                   "the data has none registered")
        return droplets

    def _step(self, elbo, mb) -> torch.Tensor:
        """One SVI step on minibatch ``mb``; returns the per-cell loss (on the device)."""
        n_train, kl_weight = len(self.train_idx), self.plan.kl_weight(self.step, self.epoch)
        with watch_latent(self.adversary, kl_weight) as adversary:  # None: no adversary now
            loss = elbo.differentiable_loss(
                self.module.model, self.module.guide, *mb.args(), **mb.kwargs(), idx=mb.idx,
                n_obs=n_train, kl_weight=kl_weight) / n_train
        self.optimizer.zero_grad(set_to_none=True)
        (loss if adversary is None else loss + adversary.fool_loss(mb.s)).backward()
        if self.world > 1:
            # Every process joins the all-reduce, even with a NaN loss, so they all see the same
            # averaged loss and stop together. The averaged gradient estimates the same per-cell
            # ELBO gradient (each process's plate scales by n_train / its cells), as DDP would.
            loss = ddp.all_reduce_gradients(self.params, loss)
        self._mask_gradients()
        self._decay_masked()  # before the step, as AdamW decays (lr of this step)
        self.optimizer.step()
        if adversary is not None:
            adversary.classifier_step(mb.s, self.world)
        self.step += 1
        return loss.detach()

    def _mask_gradients(self) -> None:
        """Frozen entries of masked parameters get gradient 0 (``where``, so even a NaN there is
        cleared); with Adam, trainable ones get its L2 term ``weight_decay * p`` (their group
        has none; AdamW's decoupled decay is :meth:`_decay_masked`)."""
        decay = self.plan.weight_decay if self.plan.optimizer == "Adam" else 0.0
        for p, mask in self.grad_masks:
            if p.grad is not None:
                p.grad = torch.where(mask, p.grad + decay * p.detach(), 0.0)

    @torch.no_grad()
    def _decay_masked(self) -> None:
        """AdamW's decoupled weight decay ``p <- p (1 - lr wd)`` on the trainable entries of
        masked parameters only (their group has none, so the frozen entries never move)."""
        if self.plan.optimizer != "AdamW" or not self.plan.weight_decay or not self.grad_masks:
            return
        lr = self.optimizer.param_groups[-1]["lr"]
        for p, mask in self.grad_masks:
            p.mul_(torch.where(mask, 1.0 - lr * self.plan.weight_decay, 1.0))

    def _train_mode(self) -> None:
        """Training mode, except for modules the module lists in ``eval_during_training``
        (frozen BatchNorm layers of a mapped query: reference running statistics, not updated)."""
        self.module.train()
        for name in getattr(self.module, "eval_during_training", ()):
            self.module.get_submodule(name).eval()

    def _run_epoch(self, epoch: int) -> torch.Tensor:
        """The SVI steps of one epoch; their losses (CPU), stopped early after a divergence."""
        self.epoch = epoch  # for an epoch-wise KL warm-up
        if self.world > 1:
            # Per process and epoch: different draws on every process, and a resumed run
            # continues exactly (no torch RNG state of rank > 0 to checkpoint).
            seed_torch(int(np.random.SeedSequence(
                [self.plan.seed, epoch, self.rank]).generate_state(1)[0]))
        self._train_mode()
        elbo, losses = make_elbo(self.module), []
        with self.module.fast_calls():
            for mb in self._minibatches():
                # Kept on the device: reading each loss would make the CPU wait for a GPU.
                losses.append(self._step(elbo, mb))
                if len(losses) % CHECK_EVERY == 0 and not torch.isfinite(
                        torch.stack(losses[-CHECK_EVERY:])).all():
                    break
        return torch.stack(losses).cpu() if losses else torch.zeros(0)

    def _check_divergence(self, losses: torch.Tensor, epoch: int) -> None:
        bad = (~torch.isfinite(losses)).nonzero()
        if not len(bad):
            return
        # Steps after the first bad one ran on broken parameters: roll the whole epoch back.
        self.module.load_state_dict(self.last_good)
        b = int(bad[0, 0])
        raise TrainingDivergedError(
            f"loss became {losses[b].item()} at epoch {epoch}, step {b} (global step "
            f"{self.step - len(losses) + b}); the model keeps the parameters of the end of the "
            "last completed epoch. Try a lower lr, check the input for outliers, or use a "
            "larger batch_size.")

    def _evaluate(self, row: dict) -> None:
        """ELBO terms on the training probe and the validation cells, into ``row``."""
        for name, idx in (("train", self.train_probe), ("validation", self.val_idx)):
            if not len(idx):
                continue
            if self.world == 1:
                terms = evaluate(self.module, self.data, idx)
            else:
                # Each process evaluates its part; the sums give the same means everywhere.
                part = ddp.shard(idx, self.rank, self.world)
                part_terms = evaluate(self.module, self.data, part)
                sums = ddp.all_reduce_sum([v * len(part) for v in part_terms.values()])
                terms = {k: total / len(idx) for k, total in zip(part_terms, sums)}
            for key, value in terms.items():
                row[f"{key}_{name}"] = value
        if getattr(self.module, "empty_droplets", False):
            row["elbo_droplets"] = droplet_elbo(self.module, self._droplets())

    def _end_epoch(self, epoch: int, losses: torch.Tensor) -> dict:
        """Record the epoch, update the schedule and early stopping; the epoch's history row."""
        if self.world > 1:
            ddp.average_batchnorm_stats(self.module)  # eval mode must agree on every process
        # Cheap enough once per epoch; a divergence within an epoch rolls back to here.
        self.last_good = self._snapshot()
        plan = self.plan
        row = {"epoch": epoch, "loss_train": losses.mean().item() if len(losses) else math.nan,
               "kl_weight": plan.kl_weight(self.step - 1, epoch) if len(losses) else math.nan,
               "lr": self.optimizer.param_groups[0]["lr"]}
        if not plan.validates(epoch):  # check_val_every_n_epoch > 1: no evaluation this epoch
            self.history.append(row)
            return row
        self._evaluate(row)
        self.history.append(row)

        def metric(name: str) -> float:  # the validation metric, or its training-probe value
            return row.get(name, row.get(name.replace("_validation", "_train")))

        if self.scheduler is not None:
            self.scheduler.step(metric(plan.lr_scheduler_metric))
        monitor = metric(plan.early_stopping_monitor)
        if monitor < self.best - plan.early_stopping_min_delta:
            self.best, self.best_epoch = monitor, epoch
        elif (plan.early_stopping and len(self.val_idx)
              and epoch - self.best_epoch >= plan.early_stopping_patience):
            self.stopped = True
        return row

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> tuple[pd.DataFrame, dict]:
        """Train until ``max_epochs`` or early stopping; ``(history, split)`` as :func:`train`.

        The global random generators are seeded with the plan's seed (or set to the
        checkpoint's states) for the run and restored afterwards.
        """
        with rng_scope(self.plan.seed):
            if self.plan.adversarial_classifier:
                self._make_adversary()
            if self.resumed_rng is not None:
                # last: the split drew from self.rng before the checkpoint's state replaces it
                set_rng_states(self.rng, self.resumed_rng)
            self._run()
        self._warn_unfinished_warmup()
        self.module.eval()
        frame = pd.DataFrame(self.history)
        frame = frame.set_index("epoch") if len(frame) else frame.rename_axis("epoch")
        return frame, {"train": self.train_idx, "validation": self.val_idx, "test": self.test_idx}

    def _run(self) -> None:
        epochs = range(self.start_epoch, self.max_epochs) if not self.stopped else range(0)
        bar = tqdm(epochs, desc="Training", disable=not self.progress_bar or self.rank != 0,
                   unit="epoch", initial=self.start_epoch,
                   total=max(self.max_epochs, self.start_epoch))
        for epoch in bar:
            losses = self._run_epoch(epoch)
            self._check_divergence(losses, epoch)
            row = self._end_epoch(epoch, losses)
            bar.set_postfix(elbo_train=f"{row.get('elbo_train', math.nan):.1f}",
                            elbo_val=f"{row.get('elbo_validation', math.nan):.1f}")
            if self.checkpoint_dir is not None and self.rank == 0 and (
                    self.stopped or (epoch + 1) % self.checkpoint_every == 0
                    or epoch + 1 == self.max_epochs):
                self._checkpoint(epoch + 1)
            if self.stopped:
                break

    def _warn_unfinished_warmup(self) -> None:
        """A run that ends during the KL warm-up fitted a down-weighted prior: say so, and how
        to finish it."""
        plan = self.plan
        weight = plan.kl_weight(self.step - 1, self.epoch)
        if not self.step or weight >= plan.max_kl_weight or self.rank != 0:
            return
        if plan.n_epochs_kl_warmup:  # the weight of epoch e (from 0) is e / n_epochs_kl_warmup
            n_warmup, epochs = plan.n_epochs_kl_warmup, self.epoch + 1
            logger.warning(
                "training ended during the KL warm-up (KL weight %.2f after %d of "
                "n_epochs_kl_warmup=%d epochs): the model is not yet fitted to the full ELBO. "
                "Train for at least %d epochs (max_epochs), or shorten the warm-up to the epochs "
                "this run took (n_epochs_kl_warmup=%d or fewer).",
                weight, epochs, n_warmup, n_warmup + 1, max(1, epochs - 1))
            return
        n_warmup = plan.n_steps_kl_warmup
        per_epoch = max(1, math.ceil(len(self.train_idx) / (plan.batch_size * self.world)))
        logger.warning(
            "training ended during the KL warm-up (KL weight %.2f after %d of "
            "n_steps_kl_warmup=%d steps): the model is not yet fitted to the full ELBO. Train "
            "for at least %d epochs (max_epochs; %d steps per epoch here), or shorten the "
            "warm-up to the steps this run took (n_steps_kl_warmup=%d or fewer).",
            weight, self.step, n_warmup, math.ceil(n_warmup / per_epoch), per_epoch,
            max(1, self.step - 1))  # the weight of step i (from 0) is i / n_steps_kl_warmup


def train(
    module: TotalVIModule,
    data: CiteData,
    max_epochs: int | None = None,
    lr: float = 4e-3,
    weight_decay: float = 1e-6,
    eps: float = 0.01,
    batch_size: int = 256,
    train_size: float | None = 0.9,
    early_stopping: bool = True,
    early_stopping_patience: int = 45,
    reduce_lr_on_plateau: bool = True,
    lr_patience: int = 30,
    lr_factor: float = 0.6,
    n_steps_kl_warmup: int | None = None,
    adversarial_classifier: bool = False,
    seed: int = 0,
    progress_bar: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    strategy: str | None = None,
    external_indexing: list | None = None,
    **plan_settings,
) -> tuple[pd.DataFrame, dict]:
    """Train ``module`` on ``data`` by minibatch SVI, on the device that holds ``module`` (move
    it first); minibatches are cut from ``data`` on the CPU and moved there step by step.

    Parameters
    ----------
    max_epochs, lr, weight_decay, eps
        Default :func:`default_max_epochs`; Adam settings (scvi-tools' TOTALVI defaults).
    batch_size, train_size, validation_size, shuffle_set_split, external_indexing
        Minibatch size (at least 2: BatchNorm) and the split (:meth:`Trainer._split`;
        ``train_size=None``: 0.9; ``external_indexing``: ``[train, validation, test]``).
    early_stopping, early_stopping_patience, reduce_lr_on_plateau, lr_patience, lr_factor
        Stop when the validation ELBO has not improved for ``early_stopping_patience`` epochs;
        multiply the learning rate by ``lr_factor`` after ``lr_patience`` such epochs.
    check_val_every_n_epoch
        Evaluate the validation (and training-probe) ELBO every this many epochs (default 1);
        the schedule and early stopping act then, their patience still counted in epochs; other
        epochs' history rows have NaN ELBOs.
    n_steps_kl_warmup, n_epochs_kl_warmup
        Linear KL warm-up on ``z``, ``beta`` (and, with ``protein_warmup``, the proteins) over
        this many steps (default ``0.75 * n_cells``) or, taking precedence, epochs.
    adversarial_classifier
        Train an adversarial batch classifier on ``z`` during the KL warm-up, as scvi-tools
        (:mod:`pyro_totalvi.adversarial`); needs at least 2 batches.
    seed
        Seeds the split, the minibatch order and every draw.
    checkpoint_dir, checkpoint_every, resume
        Every ``checkpoint_every`` epochs and at the end, atomically replace
        ``checkpoint_dir/checkpoint.pt`` (parameters, optimiser, scheduler, RNG states, history,
        split, ...). ``resume`` continues from it (same architecture, data and settings) and
        ends exactly as the uninterrupted run; ``FileNotFoundError`` without a checkpoint.
    strategy
        ``None``/``"single"``: this process alone. ``"ddp"``: data-parallel over a
        ``torch.distributed`` group (README, "Training on several GPUs or machines"): every
        process calls ``train`` alike; ``batch_size`` is per process; only rank 0 checkpoints.
    **plan_settings
        ``validation_size``, ``n_epochs_kl_warmup``, the other :class:`TrainingPlan` fields.

    Returns
    -------
    history
        A row per epoch: ``elbo_*``, ``reconstruction_loss_*``, ``kl_local_*`` (per cell, full
        KL weight), ``loss_train`` (the optimised, warmed-up objective), ``kl_weight``, ``lr``;
        with empty droplets, ``elbo_droplets`` (negative ELBO per droplet, their own terms of
        the objective); after ``resume``, the checkpointed epochs first.
    split
        ``{"train": indices, "validation": indices, "test": indices}``.
    """
    fields = {f.name for f in dataclass_fields(TrainingPlan)} - {"world_size", "external_split"}
    unknown = sorted(set(plan_settings) - fields)
    if unknown:
        raise TypeError(f"train() got unexpected settings {unknown}; accepted: {sorted(fields)}")
    named = {k: v for k, v in locals().items() if k in fields}  # this function's arguments
    plan = TrainingPlan(**named, **plan_settings)
    return Trainer(module, data, plan, max_epochs, progress_bar, checkpoint_dir,
                   checkpoint_every, resume, strategy, external_indexing).run()
