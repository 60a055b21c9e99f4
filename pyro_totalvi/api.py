"""The user-facing ``TOTALVI`` class, called as scvi-tools' TOTALVI is."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .data import (
    REGISTRY_KEY,
    CiteData,
    TotalVIDataError,
    library_log_stats,
    protein_background_prior,
    register_anndata,
)
from .de import DEMixin
from .model import TotalVIModule
from .posterior import PosteriorMixin
from .train import train

__all__ = ["TOTALVI"]

logger = logging.getLogger("pyro_totalvi")

FORMAT_VERSION = 1


class TOTALVI(PosteriorMixin, DEMixin):
    """totalVI on AnnData: register with :meth:`setup_anndata`, then ``TOTALVI(adata).train()``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Dimension of z.
    protein_mixture
        ``"marginal"`` (v summed out analytically, ``Trace_ELBO``) or ``"enumerate"`` (v a
        Pyro sample site summed out by ``TraceEnum_ELBO``).
    use_observed_lib_size
        Library size observed (log total counts) or latent with the prior of Eq. (5).
    empirical_protein_background_prior
        Initialise c, d of Eq. (11) from per-batch Gaussian mixtures; default: when there are more
        than 10 proteins (as scvi-tools).
    seed
        Seeds the initial network weights (the global torch RNG is left as it was).
    **network_kwargs
        ``n_hidden``, ``n_layers_encoder``, ``dropout_rate_encoder``, ``dropout_rate_decoder``.

    Examples
    --------
    >>> TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
    ...                       batch_key="batch")
    >>> model = TOTALVI(adata)
    >>> model.train()
    >>> adata.obsm["X_totalvi"] = model.get_latent_representation()
    """

    def __init__(
        self,
        adata: AnnData,
        n_latent: int = 20,
        protein_mixture: Literal["marginal", "enumerate"] = "marginal",
        use_observed_lib_size: bool = True,
        empirical_protein_background_prior: bool | None = None,
        seed: int = 0,
        **network_kwargs,
    ):
        self.adata = adata
        self.data = CiteData(adata)
        self.registry = self.data.registry
        if empirical_protein_background_prior is None:
            empirical_protein_background_prior = self.data.n_proteins > 10
        self.init_params = dict(
            n_latent=n_latent,
            protein_mixture=protein_mixture,
            use_observed_lib_size=use_observed_lib_size,
            empirical_protein_background_prior=bool(empirical_protein_background_prior),
            **network_kwargs,
        )
        missing = ~self.data.protein_measured
        for b, t in zip(*np.nonzero(missing)):
            logger.info("protein %r is treated as missing in batch %r (all zero there)",
                        self.registry["protein_names"][t], self.registry["batch_categories"][b])
        l_mu, l_var = library_log_stats(self.data)
        prior_mean = prior_scale = None
        if empirical_protein_background_prior:
            prior_mean, prior_scale = map(torch.from_numpy, protein_background_prior(self.data))
        network = {k: v for k, v in self.init_params.items()
                   if k != "empirical_protein_background_prior"}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.module = TotalVIModule(
                self.data.n_genes,
                self.data.n_proteins,
                self.data.n_batches,
                library_log_means=torch.from_numpy(l_mu),
                library_log_vars=torch.from_numpy(l_var),
                background_prior_mean=prior_mean,
                background_prior_scale=prior_scale,
                **network,
            )
        self.history: pd.DataFrame | None = None
        self.is_trained = False
        self.split: dict | None = None

    def __repr__(self) -> str:
        d = self.data
        return (f"TOTALVI: {d.n_obs} cells, {d.n_genes} genes, {d.n_proteins} proteins, "
                f"{d.n_batches} batches, n_latent={self.module.n_latent}, "
                f"protein_mixture={self.module.protein_mixture!r}, trained={self.is_trained}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        protein_expression_obsm_key: str = "protein_expression",
        batch_key: str | None = None,
        layer: str | None = None,
        non_integer: Literal["warn", "error"] = "warn",
    ) -> None:
        """Validate ``adata`` and register where its counts and batches are.

        Writes only ``adata.uns["_pyro_totalvi"]``. Raises on NaN, infinite or negative counts,
        on a protein table whose cell names differ from ``adata.obs_names``, on missing keys and
        on cells without RNA counts; each message names the offending column, feature or cell.

        Parameters
        ----------
        protein_expression_obsm_key
            ``adata.obsm`` key of the protein counts (DataFrame or array, cells x proteins).
        batch_key
            ``adata.obs`` column of batches (``s`` in the model); ``None`` for one batch.
        layer
            Layer of RNA counts; ``None`` for ``adata.X``.
        non_integer
            Non-integer counts give a warning (``"warn"``) or an error (``"error"``).
        """
        register_anndata(adata, protein_expression_obsm_key, batch_key, layer, non_integer)

    # ------------------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 4e-3,
        batch_size: int = 256,
        train_size: float = 0.9,
        early_stopping: bool = True,
        seed: int = 0,
        progress_bar: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        **kwargs,
    ) -> TOTALVI:
        """Train by minibatch SVI; see :func:`pyro_totalvi.train.train` for ``**kwargs``.

        The per-epoch history (ELBO, reconstruction, KL on training and validation cells) is
        stored in :attr:`history`.

        With ``checkpoint_dir``, a checkpoint (parameters, optimiser, RNG states, history, ...)
        is written atomically to ``checkpoint_dir/checkpoint.pt`` every ``checkpoint_every``
        epochs and at the end. After an interruption, ``TOTALVI(adata, <same settings>)
        .train(<same arguments>, checkpoint_dir=..., resume=True)`` continues from it and ends
        exactly as the uninterrupted run would have; other data or settings raise.
        """
        torch.manual_seed(seed)
        history, split = train(self.module, self.data, max_epochs=max_epochs, lr=lr,
                               batch_size=batch_size, train_size=train_size,
                               early_stopping=early_stopping, seed=seed,
                               progress_bar=progress_bar, checkpoint_dir=checkpoint_dir,
                               checkpoint_every=checkpoint_every, resume=resume, **kwargs)
        self.history = history if self.history is None else pd.concat([self.history, history])
        self.split = split
        self.is_trained = True
        return self

    # ------------------------------------------------------------------------------------------
    def _data(self, adata: AnnData | None) -> CiteData:
        """The data for a query: training data, or ``adata`` checked against the registry."""
        if adata is None or adata is self.adata:
            return self.data
        var_names = list(self.adata.var_names)
        if list(adata.var_names) != var_names:
            extra = sorted(set(adata.var_names) - set(var_names))[:5]
            absent = sorted(set(var_names) - set(adata.var_names))[:5]
            raise TotalVIDataError(
                "adata genes differ from the training data "
                f"(n={adata.n_vars} vs {len(var_names)}; unknown: {extra}, missing: {absent}); "
                "subset and order them as adata_train.var_names"
            )
        return CiteData(adata, self.registry)

    @staticmethod
    def _indices(data: CiteData, indices) -> np.ndarray:
        if indices is None:
            return np.arange(data.n_obs)
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return indices.astype(np.int64)

    # ------------------------------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``settings.json`` (format version, settings, names) and ``params.pt``.

        Files are written to a temporary name and renamed, so an interrupted save never leaves a
        half-written model.
        """
        path = Path(dir_path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        settings = {
            "format_version": FORMAT_VERSION,
            "init_params": self.init_params,
            "registry": _jsonable(self.registry),
            "var_names": list(map(str, self.adata.var_names)),
            "is_trained": self.is_trained,
        }
        _atomic_write(path / "settings.json", json.dumps(settings, indent=1).encode())
        with tempfile.NamedTemporaryFile(dir=path, delete=False) as f:
            try:
                torch.save(self.module.state_dict(), f)
            except BaseException:
                f.close()
                os.unlink(f.name)
                raise
        os.replace(f.name, path / "params.pt")
        if self.history is not None:
            _atomic_write(path / "history.csv", self.history.to_csv().encode())
        elif (path / "history.csv").exists():  # overwrite=True: not another model's history
            (path / "history.csv").unlink()

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData) -> TOTALVI:
        """Load a saved model for ``adata``; genes, proteins and batches must match the saved ones.

        ``adata`` is registered with the saved settings if it is not registered yet.
        """
        path = Path(dir_path)
        settings = json.loads((path / "settings.json").read_text())
        if settings.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {settings.get('format_version')}; this "
                             f"pyro_totalvi reads version {FORMAT_VERSION}")
        if list(map(str, adata.var_names)) != settings["var_names"]:
            raise TotalVIDataError(f"adata genes differ from the saved model's "
                                   f"({adata.n_vars} vs {len(settings['var_names'])} genes)")
        reg = settings["registry"]
        if REGISTRY_KEY not in adata.uns:
            register_anndata(adata, reg["protein_expression_obsm_key"], reg["batch_key"],
                             reg["layer"])
        saved_cats, cats = reg["batch_categories"], list(adata.uns[REGISTRY_KEY]["batch_categories"])
        if not set(cats) <= set(saved_cats):
            raise TotalVIDataError(f"adata has batches unseen by the saved model: "
                                   f"{sorted(set(cats) - set(saved_cats))}")
        adata.uns[REGISTRY_KEY] = dict(reg)  # codes must follow the saved categories
        init = dict(settings["init_params"])
        init["empirical_protein_background_prior"] = False  # parameters come from the file
        model = cls(adata, **init)
        model.init_params = settings["init_params"]
        model.module.load_state_dict(torch.load(path / "params.pt", weights_only=True))
        model.module.eval()
        model.is_trained = settings["is_trained"]
        if (path / "history.csv").exists():
            model.history = pd.read_csv(path / "history.csv", index_col=0)
        return model


def _jsonable(d: dict) -> dict:
    return {k: (list(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else v)
            for k, v in d.items()}


def _atomic_write(path: Path, payload: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
        f.write(payload)
    os.replace(f.name, path)
