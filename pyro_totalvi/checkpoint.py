"""Checkpoints of a training run, and atomic file writes (checkpoints and saved models).

A checkpoint holds everything that changes the rest of a run: parameters, optimiser and scheduler
state, all RNG states, history, split, early-stopping state, and fingerprints of the data, the
model and the training settings, so a resumed run is refused unless it continues the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyro
import pyro.util
import torch

from .data import CiteData, TotalVIDataError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "atomic_write", "data_fingerprint",
           "module_config", "get_rng_states", "set_rng_states", "write_checkpoint",
           "load_checkpoint", "check_resumable", "MODEL_FORMAT_VERSION", "read_saved_model"]

#: File name of the checkpoint inside ``checkpoint_dir``; each checkpoint replaces the last.
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
#: Version of a saved model's ``settings.json`` (:meth:`pyro_totalvi.TOTALVI.save`).
MODEL_FORMAT_VERSION = 1


def data_fingerprint(data: CiteData) -> dict:
    """Shape and a content hash of the training data, cheap and independent of X's storage.

    Hashes per-cell library sizes, per-gene totals, protein counts, batch codes and names, the
    network covariates, the protein mask, any isotype controls and empty droplets, and extension
    inputs (labels), so different cells, a different order, other counts, other genes,
    covariates, missing-protein settings or labels are all detected.
    """
    h = hashlib.blake2b(digest_size=16)
    gene_totals = np.asarray(data.X.sum(axis=0), dtype=np.float64).ravel()
    mask = data.protein_measured if data.cell_protein_mask is None else data.cell_protein_mask
    covariates = np.zeros((data.n_obs, 0)) if data.covariates is None else data.covariates
    extras = [data.extras[k] for k in sorted(getattr(data, "extras", {}))]  # e.g. labels
    for a in (data.log_library, gene_totals, data.Y, data.batch, covariates, mask, *extras):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes() if a.size else b"")
    h.update(repr((list(data.registry["protein_names"]),
                   list(data.registry["batch_categories"]))).encode())
    isotypes = [str(p) for p in data.registry.get("isotype_controls") or []]
    if isotypes:  # hashed only when present: fingerprints of older runs stay valid
        h.update(repr(isotypes).encode())
    droplets = getattr(data, "droplets", None)
    if droplets is not None:
        for a in (droplets.Y, droplets.batch):
            h.update(np.ascontiguousarray(a).tobytes())
    return {"n_obs": data.n_obs, "n_genes": data.n_genes, "n_proteins": data.n_proteins,
            "n_batches": data.n_batches, "hash": h.hexdigest()}


def module_config(module: torch.nn.Module) -> dict:
    config = {"n_latent": module.n_latent, "protein_mixture": module.protein_mixture,
              "use_observed_lib_size": module.use_observed_lib_size,
              "shapes": {k: list(v.shape) for k, v in module.state_dict().items()}}
    weights = getattr(module, "modality_weights", None)
    if weights and set(weights.values()) != {1.0}:  # only then: older checkpoints still resume
        config["modality_weights"] = dict(weights)
    return config


def get_rng_states(rng: np.random.Generator) -> dict:
    state = pyro.util.get_rng_state()  # torch (used by Pyro and dropout), random, numpy global
    name, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (name, keys.tolist(), pos, has_gauss, cached)  # loadable with weights_only
    return {"numpy_generator": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "pyro": state,
            # draws on a GPU come from its own generator
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_states(rng: np.random.Generator, states: dict) -> None:
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
        # mkstemp makes the file private (0600); give it the mode open() would (0644 with the
        # usual umask 022), as every other result file gets.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_saved_model(dir_path: str | os.PathLike, prefix: str | None = None
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``settings.json`` (format version checked) and the parameters (on the CPU) of a model that
    :meth:`pyro_totalvi.TOTALVI.save` wrote to ``dir_path`` (file names preceded by
    ``prefix``, as ``save(..., prefix=)`` wrote them)."""
    path, prefix = Path(dir_path), prefix or ""
    if not (path / f"{prefix}settings.json").is_file():
        raise FileNotFoundError(f"{path} holds no saved model (no {prefix}settings.json); save "
                                "one with model.save(dir_path" + (f", prefix={prefix!r})"
                                                                  if prefix else ")"))
    settings = json.loads((path / f"{prefix}settings.json").read_text())
    if settings.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path} has format version {settings.get('format_version')}; this "
                         f"pyro_totalvi reads version {MODEL_FORMAT_VERSION}")
    return settings, torch.load(path / f"{prefix}params.pt", weights_only=True,
                                map_location="cpu")


def write_checkpoint(directory: Path, payload: dict) -> None:
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


def check_resumable(state: dict, path, data_fp: dict, module_cfg: dict, settings: dict) -> None:
    """Refuse to resume with other data, another architecture or other training settings."""
    saved = state["data"]
    # settings added since the first checkpoints, with the value they had before
    saved_settings = {"world_size": 1, "adversarial_classifier": False, **state["settings"]}
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
    diff = {k: (cfg.get(k), module_cfg.get(k)) for k in sorted(set(cfg) | set(module_cfg))
            if k != "shapes" and cfg.get(k) != module_cfg.get(k)}  # a key on one side only too
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

