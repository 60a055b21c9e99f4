"""Minibatch SVI for :class:`~pyro_totalvi.model.TotalVIModule`.

Each step is ``Trace_ELBO`` (or ``TraceEnum_ELBO`` when ``v`` is enumerated) on one minibatch,
scaled by the plate to the full training set, divided by the number of training cells so that the
optimiser sees a per-cell loss (as scvi-tools; Adam's ``eps=0.01`` assumes that scale).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from . import distributed as ddp
from .data import CiteData, Minibatch, TotalVIDataError
from .model import TotalVIModule

__all__ = [
    "train",
    "evaluate",
    "elbo_terms",
    "TrainingDivergedError",
    "default_max_epochs",
    "make_elbo",
    "CHECKPOINT_NAME",
    "load_checkpoint",
    "resolve_device",
]

#: File name of the checkpoint inside ``checkpoint_dir``; each checkpoint replaces the last.
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the module holds the last good parameters."""


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: about 400 epochs for 20,000 cells, fewer for more cells."""
    return int(max(1, min(round(20000 / max(n_cells, 1) * 400), 400)))


def resolve_device(accelerator: str = "auto", device: int | str | torch.device = "auto"
                   ) -> torch.device:
    """The torch device that ``accelerator`` and ``device`` name (scvi-tools' conventions).

    Parameters
    ----------
    accelerator
        ``"auto"`` (a CUDA GPU when torch sees one, else the CPU; under ``torchrun``, only when
        the node has a GPU for each of its processes), ``"cpu"``, ``"gpu"``/``"cuda"`` or
        ``"mps"`` (Apple silicon).
    device
        ``"auto"`` (the current CUDA device, which ``torchrun`` sets per process), a device index
        such as ``1``, or a full name such as ``"cuda:1"`` (which then decides the accelerator).

    Raises
    ------
    ValueError
        For an unknown accelerator or a device that contradicts it.
    RuntimeError
        When the accelerator asked for is not available to this torch build.
    """
    if isinstance(device, str) and device != "auto" and not device.isdigit():
        named = torch.device(device)  # "cpu", "cuda:1", "mps"
        if accelerator not in ("auto", named.type) and not (
                accelerator == "gpu" and named.type == "cuda"):
            raise ValueError(f"device={device!r} does not match accelerator={accelerator!r}")
        accelerator, device = named.type, "auto" if named.index is None else named.index
    elif isinstance(device, torch.device):
        return resolve_device(accelerator, str(device))
    kind = str(accelerator).lower()
    if kind not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu', 'cuda' or 'mps', got "
                         f"{accelerator!r}")
    if kind == "auto":
        # Under torchrun, a GPU only when every process on this node can have its own.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        kind = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= per_node \
            else "cpu"
    if kind == "gpu":
        kind = "cuda"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise RuntimeError("accelerator='mps' but torch.backends.mps.is_available() is False")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"accelerator={accelerator!r} needs a CUDA GPU, but torch {torch.__version__} sees "
            "none (a CPU build of torch, or no driver); use accelerator='cpu'")
    index = torch.cuda.current_device() if device == "auto" else int(device)
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device={device!r}: torch sees {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return torch.device("cuda", index)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device holding ``module``'s parameters (where its minibatches must go)."""
    return next(module.parameters()).device


def make_elbo(module: TotalVIModule):
    """The Pyro ELBO matching the module's treatment of ``v``."""
    if module.protein_mixture == "enumerate":
        return TraceEnum_ELBO(max_plate_nesting=2)
    return Trace_ELBO()


def site_log_prob(site: dict) -> torch.Tensor:
    """Elementwise log density of a trace site with its mask applied (no plate scaling)."""
    lp = site["fn"].log_prob(site["value"])
    return lp if site["mask"] is None else lp * site["mask"]


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


@torch.no_grad()
def elbo_terms(module: TotalVIModule, data: CiteData, indices: np.ndarray,
               batch_size: int = 1024) -> dict[str, float]:
    """Per-cell means of each term of the negative ELBO on ``indices``, networks in eval mode.

    ``"x"`` and ``"y"``: ``-log p`` of the RNA and protein counts, a one-sample Monte Carlo
    estimate under q (with ``v`` summed out). ``"z"``, ``"l"``, ``"beta"``: analytic KL of q from
    the prior at full weight (0 for ``"l"`` with an observed library), as in scvi-tools, so the
    terms compare directly with its loss terms.
    """
    was_training = module.training
    module.eval()
    device = module_device(module)
    sums = dict.fromkeys(("x", "y", "z", "l", "beta"), 0.0)
    # v summed out: the same ELBO as enumeration, without the enumeration dimension. No Pyro
    # validation, as in training steps: it would reject the non-integer counts that
    # setup_anndata accepts with a warning (the NB log density is defined for them).
    try:
        with module.v_summed_out(), module.fast_calls():
            for start in range(0, len(indices), batch_size):
                mb = data.minibatch(indices[start : start + batch_size], device)
                guide_tr = poutine.trace(module.guide).get_trace(*mb.args())
                model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(
                    *mb.args()
                )
                for name in ("x", "y"):
                    sums[name] -= site_log_prob(model_tr.nodes[name]).sum().item()
                for name in ("z", "l", "beta"):
                    if name not in guide_tr.nodes:
                        continue
                    q, p = guide_tr.nodes[name]["fn"], model_tr.nodes[name]["fn"]
                    k = kl_divergence(q, p)
                    mask = model_tr.nodes[name]["mask"]
                    sums[name] += (k if mask is None else k * mask).sum().item()
    finally:
        module.train(was_training)
    n = max(len(indices), 1)
    return {name: total / n for name, total in sums.items()}


def evaluate(module: TotalVIModule, data: CiteData, indices: np.ndarray, batch_size: int = 1024):
    """Mean per-cell ELBO on ``indices``, full KL weight: :func:`elbo_terms` summed up.

    Returns
    -------
    dict with ``elbo`` (negative ELBO per cell), ``reconstruction_loss`` and ``kl_local``.
    """
    terms = elbo_terms(module, data, indices, batch_size)
    recon = terms["x"] + terms["y"]
    kl = terms["z"] + terms["l"] + terms["beta"]
    return {"elbo": recon + kl, "reconstruction_loss": recon, "kl_local": kl}


# ----------------------------------------------------------------------------------------------
# Checkpoints
def _data_fingerprint(data: CiteData) -> dict:
    """Shape and a content hash of the training data, cheap and independent of X's storage.

    Hashes per-cell library sizes, per-gene totals, protein counts, batch codes and names, the
    network covariates and the protein mask, so different cells, a different order, other
    counts, other genes, covariates or missing-protein settings are all detected.
    """
    h = hashlib.blake2b(digest_size=16)
    gene_totals = np.asarray(data.X.sum(axis=0), dtype=np.float64).ravel()
    mask = data.protein_measured if data.cell_protein_mask is None else data.cell_protein_mask
    covariates = np.zeros((data.n_obs, 0)) if data.covariates is None else data.covariates
    for a in (data.log_library, gene_totals, data.Y, data.batch, covariates, mask):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes() if a.size else b"")
    h.update(repr((list(data.registry["protein_names"]),
                   list(data.registry["batch_categories"]))).encode())
    return {"n_obs": data.n_obs, "n_genes": data.n_genes, "n_proteins": data.n_proteins,
            "n_batches": data.n_batches, "hash": h.hexdigest()}


def _module_config(module: TotalVIModule) -> dict:
    return {"n_latent": module.n_latent, "protein_mixture": module.protein_mixture,
            "use_observed_lib_size": module.use_observed_lib_size,
            "shapes": {k: list(v.shape) for k, v in module.state_dict().items()}}


def _get_rng_states(rng: np.random.Generator) -> dict:
    state = pyro.util.get_rng_state()  # torch (used by Pyro and dropout), random, numpy global
    name, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (name, keys.tolist(), pos, has_gauss, cached)  # loadable with weights_only
    return {"numpy_generator": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "pyro": state,
            # draws on a GPU come from its own generator
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def _set_rng_states(rng: np.random.Generator, states: dict) -> None:
    pyro_state = dict(states["pyro"])
    name, keys, pos, has_gauss, cached = pyro_state["numpy"]
    pyro_state["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    pyro.util.set_rng_state(pyro_state)
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = states["numpy_generator"]


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then ``os.replace`` it: a reader
    (or a crash) sees the previous file or the new one, never a partial file, and no temporary
    file is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_checkpoint(directory: Path, payload: dict) -> None:
    atomic_write(directory / CHECKPOINT_NAME, lambda f: torch.save(payload, f))


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint that :func:`train` wrote to ``checkpoint_dir`` (a dict of plain values and
    tensors: ``epoch``, ``history``, ``module``, ``optimizer``, ``rng``, ``split``, ...)."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"resume=True but there is no checkpoint {path}; train once with "
            f"checkpoint_dir={str(checkpoint_dir)!r} (and resume=False) first."
        )
    try:
        # Tensors come back on the CPU; load_state_dict moves them to the module's device.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise ValueError(f"{path} has checkpoint format version {version}; this pyro_totalvi "
                         f"reads version {CHECKPOINT_VERSION}")
    return state


def _check_resumable(state: dict, path, data_fp: dict, module_cfg: dict, settings: dict) -> None:
    """Refuse to resume with other data, another architecture or other training settings."""
    saved = state["data"]
    saved_settings = {"world_size": 1, **state["settings"]}  # written before world_size existed
    if any(saved[k] != data_fp[k] for k in ("n_obs", "n_genes", "n_proteins", "n_batches")):
        raise TotalVIDataError(
            f"checkpoint {path} was written for data of {saved['n_obs']} cells x "
            f"{saved['n_genes']} genes x {saved['n_proteins']} proteins x {saved['n_batches']} "
            f"batches; this data has {data_fp['n_obs']} x {data_fp['n_genes']} x "
            f"{data_fp['n_proteins']} x {data_fp['n_batches']}. Resume on the same AnnData."
        )
    if saved["hash"] != data_fp["hash"]:
        raise TotalVIDataError(
            f"checkpoint {path} was written for other data of the same shape (the counts, cell "
            "order or batches differ). Resume on the same AnnData."
        )
    cfg = state["module_config"]
    diff = {k: (cfg.get(k), module_cfg[k]) for k in module_cfg
            if k != "shapes" and cfg.get(k) != module_cfg[k]}
    if diff or cfg.get("shapes") != module_cfg["shapes"]:
        shapes = sorted(k for k in set(cfg["shapes"]) | set(module_cfg["shapes"])
                        if cfg["shapes"].get(k) != module_cfg["shapes"].get(k))
        raise ValueError(
            f"checkpoint {path} holds a different model: "
            + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
            + (f"; parameter shapes differ for {shapes[:5]}" if shapes else "")
            + ". Create the model with the same settings (n_latent, n_hidden, ...)."
        )
    bad = {k: (saved_settings.get(k), v) for k, v in settings.items()
           if saved_settings.get(k) != v}
    if bad:
        raise ValueError(
            f"checkpoint {path} was written with other training settings: "
            + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in bad.items())
            + ". Resume with the same settings (only max_epochs, checkpoint_every and "
            "progress_bar may change)."
        )


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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    strategy: str | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Train ``module`` on ``data`` by minibatch SVI, on the device that holds ``module``.

    Minibatches are cut from ``data`` on the CPU and moved to that device step by step; move the
    module first (``module.to("cuda")``, or ``TOTALVI.train(accelerator=...)``).

    Parameters
    ----------
    max_epochs
        Default :func:`default_max_epochs`.
    lr, weight_decay, eps
        Adam settings (scvi-tools' TOTALVI defaults).
    batch_size, train_size
        Minibatch size (at least 2: BatchNorm) and the fraction of cells used for training (the
        rest validate). At least 2 cells always train; with 2 cells, none validate.
    early_stopping, early_stopping_patience
        Stop when the validation ELBO has not improved for this many epochs.
    reduce_lr_on_plateau, lr_patience, lr_factor
        Multiply the learning rate by ``lr_factor`` after ``lr_patience`` epochs without
        improvement of the validation ELBO.
    n_steps_kl_warmup
        Linear KL warm-up on ``z`` and ``beta`` over this many steps; default ``0.75 * n_cells``.
    seed
        Seeds the split, the minibatch order and every draw: same seed, same result.
    checkpoint_dir, checkpoint_every
        Every ``checkpoint_every`` epochs and at the end, atomically write
        ``checkpoint_dir/checkpoint.pt`` (replacing the previous one): parameters, optimiser and
        scheduler state, epoch and step, all RNG states, history, split and early-stopping state.
        Without ``resume``, the run starts afresh and replaces any checkpoint there.
    resume
        Continue from the checkpoint in ``checkpoint_dir`` (the same ``module`` architecture,
        ``data`` and settings; ``max_epochs`` may differ). A run interrupted after ``k`` epochs
        and resumed ends exactly as the uninterrupted run. Raises ``FileNotFoundError`` without a
        checkpoint, :class:`~pyro_totalvi.TotalVIDataError` for other data and ``ValueError``
        for another model or other settings.
    strategy
        ``None`` or ``"single"``: this process alone. ``"ddp"``: data-parallel over the processes
        of a ``torch.distributed`` group (made from torchrun's environment variables if none is
        initialised; see :mod:`pyro_totalvi.distributed`). Every process must call ``train`` with
        the same data, model and arguments. ``batch_size`` is then per process (a step sees
        ``world_size * batch_size`` cells); rank 0 broadcasts its parameters and buffers first,
        gradients are averaged after every backward pass, BatchNorm statistics at every epoch's
        end, and validation is split across processes and summed, so every process holds the
        same parameters and history and stops at the same epoch. Only rank 0 writes checkpoints;
        on ``resume`` rank 0 reads the checkpoint and sends it to the others.

    Returns
    -------
    history
        One row per epoch: ``elbo_train``, ``elbo_validation``, ``reconstruction_loss_*``,
        ``kl_local_*`` (per cell, full KL weight), ``loss_train`` (the optimised objective with
        the warm-up weight), ``kl_weight`` and ``lr``. After ``resume``, the checkpointed epochs
        come first.
    split
        ``{"train": indices, "validation": indices}``.
    """
    n = data.n_obs
    if n < 2:
        raise TotalVIDataError(
            f"training needs at least 2 cells (BatchNorm normalises over a minibatch); the data "
            f"has {n}."
        )
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}")
    if int(batch_size) < 2:
        raise ValueError(f"batch_size must be at least 2 (BatchNorm), got {batch_size}")
    batch_size = int(batch_size)
    if int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir that the interrupted run wrote to")
    if strategy not in (None, "single", "ddp"):
        raise ValueError(f"strategy must be None, 'single' or 'ddp', got {strategy!r}")
    rank, world = 0, 1
    if strategy == "ddp":
        ddp.init_distributed()  # no-op if a process group exists; a clear error outside torchrun
        rank, world = ddp.get_rank(), ddp.get_world_size()
    max_epochs = default_max_epochs(n) if max_epochs is None else int(max_epochs)
    n_steps_kl_warmup = int(0.75 * n) if n_steps_kl_warmup is None else n_steps_kl_warmup
    rng = np.random.default_rng(seed)
    pyro.set_rng_seed(seed)
    perm = rng.permutation(n)
    # At least 2 training cells (BatchNorm); tiny data sets give up validation first.
    n_train = n if train_size >= 1.0 else max(2, min(n - 1, int(math.ceil(train_size * n))))
    train_idx, val_idx = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    # A fixed sample of training cells, as large as the validation set, tracks elbo_train with
    # the full KL weight at a fraction of an epoch's cost.
    train_probe = np.sort(rng.choice(train_idx, min(len(train_idx), max(len(val_idx), 256)),
                                     replace=False))
    if world > 1:
        if n_train < 2 * world:
            raise TotalVIDataError(
                f"{world} processes need at least {2 * world} training cells (2 per process for "
                f"BatchNorm); there are {n_train}. Use fewer processes."
            )
        # Initial weights, empirical background prior and library-size prior buffers: rank 0's.
        ddp.broadcast_module(module)

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
    start_epoch, stopped = 0, False

    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        data_fp, module_cfg = _data_fingerprint(data), _module_config(module)
        # Everything that changes the trajectory; max_epochs does not (until it ends it).
        settings = dict(
            seed=seed, lr=float(lr), weight_decay=float(weight_decay), eps=float(eps),
            batch_size=batch_size, train_size=float(train_size),
            early_stopping=bool(early_stopping), early_stopping_patience=early_stopping_patience,
            reduce_lr_on_plateau=bool(reduce_lr_on_plateau), lr_patience=lr_patience,
            lr_factor=float(lr_factor), n_steps_kl_warmup=n_steps_kl_warmup, world_size=world,
        )
    if resume and world > 1:
        # Rank 0 reads the file (other nodes need not see it) and sends it, or its error, to all.
        try:
            state = load_checkpoint(checkpoint_dir) if rank == 0 else None
        except (OSError, ValueError) as err:
            state = err
        state = ddp.broadcast_object(state)
        if isinstance(state, BaseException):
            raise state
    elif resume:
        state = load_checkpoint(checkpoint_dir)
    if resume:
        _check_resumable(state, checkpoint_dir / CHECKPOINT_NAME, data_fp, module_cfg, settings)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        last_good = state["last_good"]
        history = list(state["history"])
        best, best_epoch, step = state["best"], state["best_epoch"], state["step"]
        start_epoch, stopped = state["epoch"], state["stopped_early"]
        split = state["split"]
        train_idx, val_idx, train_probe = (split[k].numpy() for k in
                                           ("train", "validation", "train_probe"))
        _set_rng_states(rng, state["rng"])  # last: the split above drew from the seeded RNGs

    def checkpoint(epochs_done: int) -> None:
        _write_checkpoint(checkpoint_dir, {
            "format_version": CHECKPOINT_VERSION,
            "data": data_fp, "module_config": module_cfg, "settings": settings,
            "epoch": epochs_done, "step": step, "best": best, "best_epoch": best_epoch,
            "stopped_early": stopped, "history": history,
            # At the end of an epoch the module's state *is* last_good: one dict, stored once.
            "module": last_good, "last_good": last_good,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": _get_rng_states(rng),
            "split": {"train": torch.from_numpy(train_idx),
                      "validation": torch.from_numpy(val_idx),
                      "train_probe": torch.from_numpy(train_probe)},
        })

    epochs = range(start_epoch, max_epochs) if not stopped else range(0)
    bar = tqdm(epochs, desc="Training", disable=not progress_bar or rank != 0, unit="epoch",
               initial=start_epoch, total=max(max_epochs, start_epoch))
    params = [p for p in module.parameters() if p.requires_grad]
    device = module_device(module)
    block = 32 if getattr(data, "backed", False) else 1  # see _batches: contiguous disk reads
    for epoch in bar:
        if world > 1:
            # Per process and epoch: different draws (z, dropout) on every process, and a
            # resumed run continues exactly (no torch RNG state of rank > 0 to checkpoint).
            torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
        module.train()
        losses = []
        step_at_start = step
        with module.fast_calls():
            for chunk in _batches(train_idx, batch_size, rng, block, rank, world):
                mb: Minibatch = data.minibatch(chunk, device)
                # Pyro's poutine.scale needs a weight > 0: the first step uses the second's.
                kl_weight = min(1.0, max(step, 1) / n_steps_kl_warmup) if n_steps_kl_warmup else 1.0
                loss = elbo.differentiable_loss(
                    module.model, module.guide, *mb.args(), idx=mb.idx, n_obs=n_train,
                    kl_weight=kl_weight,
                ) / n_train
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    # Every process joins the all-reduce, even with a NaN loss, so they all see
                    # the same averaged loss and stop together if it is not finite. The averaged
                    # gradient estimates the same per-cell ELBO gradient (each process's plate
                    # scales by n_train / its cells), as DDP would.
                    loss = ddp.all_reduce_gradients(params, loss)
                optimizer.step()
                # Kept on the device: reading each loss would make the CPU wait for a GPU at
                # every step. Finiteness is checked every 64 steps (a long epoch stops soon after
                # a divergence) and at the end of the epoch, below.
                losses.append(loss.detach())
                step += 1
                if len(losses) % 64 == 0 and not torch.isfinite(torch.stack(losses[-64:])).all():
                    break
        losses = torch.stack(losses).cpu() if losses else torch.zeros(0)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            # Steps after the first bad one ran on broken parameters: roll the whole epoch back.
            module.load_state_dict(last_good)
            b = int(bad[0, 0])
            raise TrainingDivergedError(
                f"loss became {losses[b].item()} at epoch {epoch}, step {b} (global step "
                f"{step_at_start + b}); the model keeps the parameters of the end of the last "
                "completed epoch. Try a lower lr, check the input for outliers, or use a larger "
                "batch_size."
            )
        if world > 1:
            ddp.average_batchnorm_stats(module)  # eval mode must be the same on every process
        # Cheap enough once per epoch; a divergence within an epoch rolls back to here.
        last_good = {k: v.detach().clone() for k, v in module.state_dict().items()}
        row = {"epoch": epoch, "loss_train": losses.mean().item() if len(losses) else math.nan,
               "kl_weight": kl_weight if len(losses) else math.nan,
               "lr": optimizer.param_groups[0]["lr"]}
        for name, idx in (("train", train_probe), ("validation", val_idx)):
            if len(idx) and world > 1:
                # Each process evaluates its part; the sums over all parts give the same means
                # (and the same early-stopping decision) everywhere.
                part = ddp.shard(idx, rank, world)
                terms = evaluate(module, data, part)
                sums = ddp.all_reduce_sum([v * len(part) for v in terms.values()])
                for key, total in zip(terms, sums):
                    row[f"{key}_{name}"] = total / len(idx)
            elif len(idx):
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
            stopped = True
        if checkpoint_dir is not None and rank == 0 and (
            stopped or (epoch + 1) % checkpoint_every == 0 or epoch + 1 == max_epochs
        ):
            checkpoint(epoch + 1)
        if stopped:
            break
    module.eval()
    frame = pd.DataFrame(history)
    frame = frame.set_index("epoch") if len(frame) else frame.rename_axis("epoch")
    return frame, {"train": train_idx, "validation": val_idx}
