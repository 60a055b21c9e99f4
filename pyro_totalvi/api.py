"""The user-facing ``TOTALVI`` class, called as scvi-tools' TOTALVI is."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import distributed
from .checkpoint import MODEL_FORMAT_VERSION, atomic_write, read_saved_model
from .data import (
    REGISTRY_KEY,
    CiteData,
    TotalVIDataError,
    anndata_from_mudata,
    is_mudata,
    library_log_stats,
    protein_background_prior,
    register_anndata,
    register_like,
    register_mudata,
    registry_keys,
)
from .de import DEMixin
from .device import module_device, resolve_device
from .modality import ModalityMixin
from .model import TotalVIModule
from .posterior import PosteriorMixin
from .query import QueryMixin
from .rng import rng_scope
from .train import train

__all__ = ["TOTALVI"]

logger = logging.getLogger("pyro_totalvi")

FORMAT_VERSION = MODEL_FORMAT_VERSION

#: ``train(plan_kwargs=...)`` keys (scvi-tools' training-plan settings) that :func:`train` takes.
PLAN_KEYS = ("lr", "weight_decay", "eps", "n_steps_kl_warmup", "reduce_lr_on_plateau",
             "lr_patience", "lr_factor")


class TOTALVI(QueryMixin, PosteriorMixin, DEMixin, ModalityMixin):
    """totalVI on AnnData: register with :meth:`setup_anndata`, then ``TOTALVI(adata).train()``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, or MuData registered with
        :meth:`setup_mudata`. Every method that takes ``adata`` takes a MuData as well.
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
    module_class
        A subclass of :class:`~pyro_totalvi.TotalVIModule` (e.g. with another likelihood in an
        overridden ``model``) built with the same arguments; training, queries and
        ``load(..., module_class=)`` then use it. Default: the class's ``_module_cls``.
    **network_kwargs
        ``n_hidden``, ``n_layers_encoder``, ``dropout_rate_encoder``, ``dropout_rate_decoder``,
        ``encode_covariates`` (default ``True``; ``False``: the encoder sees neither the batch nor
        the covariates, as in scvi-tools), ``protein_warmup`` (default ``True``: the KL warm-up
        weight also multiplies the protein likelihood, as in scvi-tools 1.4),
        ``background_preference`` (default 0.1), ``min_foreground_ratio`` (default 2),
        ``background_cell_scale`` (default ``True``; see README, "Protein background"; isotype
        controls and empty droplets come from the registry, :meth:`setup_anndata`),
        ``scale_encoder_input`` (default ``False``; ``True``: the encoder's input is scaled per
        cell as scvi-tools 1.4 does, which maps RNA-only queries much better) and
        ``modality_weights`` (``{"rna": a, "protein": b}``, default 1 and 1: train on the
        tempered posterior with the RNA likelihood to the power ``a`` and the protein likelihood
        to the power ``b``; saved with the model; see :meth:`get_modality_contributions`); see
        :class:`~pyro_totalvi.TotalVIModule`.

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
        module_class: type[TotalVIModule] | None = None,
        **network_kwargs,
    ):
        module_class = module_class or self._module_cls
        #: the MuData given, if any; :attr:`adata` is then its RNA modality as an AnnData with
        #: the protein counts in ``obsm["protein_expression"]`` (see :meth:`setup_mudata`)
        self.mdata = None
        if is_mudata(adata):
            if REGISTRY_KEY not in adata.uns:
                raise TotalVIDataError(
                    "mdata is not registered: call TOTALVI.setup_mudata(mdata, ...) first.")
            self.mdata = adata
            registry = dict(adata.uns[REGISTRY_KEY])
            adata = anndata_from_mudata(self.mdata, registry)
            adata.uns[REGISTRY_KEY] = registry
        self.adata = adata
        self.data = CiteData(adata, extras=module_class.extra_inputs)
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
        self._warn_masked_proteins()
        l_mu, l_var = library_log_stats(self.data)
        prior_mean = prior_scale = None
        if empirical_protein_background_prior:
            prior_mean, prior_scale = map(torch.from_numpy, protein_background_prior(self.data))
        network = {k: v for k, v in self.init_params.items()
                   if k != "empirical_protein_background_prior"}
        network.update(self._background_options())
        with rng_scope(seed):
            self.module = module_class(
                self.data.n_genes,
                self.data.n_proteins,
                self.data.n_batches,
                n_covariates=self.data.n_covariates,
                library_log_means=torch.from_numpy(l_mu),
                library_log_vars=torch.from_numpy(l_var),
                background_prior_mean=prior_mean,
                background_prior_scale=prior_scale,
                **network,
                **self._module_kwargs(),
            )
        if "modality_weights" in self.init_params:  # validated floats: JSON-safe in save()
            self.init_params["modality_weights"] = dict(self.module.modality_weights)
        self.history: pd.DataFrame | None = None
        self.is_trained = False
        self.split: dict | None = None

    def _warn_masked_proteins(self) -> None:
        """One warning per batch naming the proteins left out of its likelihood."""
        missing = ~self.data.protein_measured
        names, batches = self.registry["protein_names"], self.registry["batch_categories"]
        user_mask = (self.registry.get("protein_mask") is not None
                     or self.registry.get("protein_mask_obsm_key") is not None)
        why = ("as protein_mask says" if user_mask else
               "all zero in every cell there; pass protein_mask to say which were measured")
        for b in np.flatnonzero(missing.any(axis=1)):
            absent = [str(names[t]) for t in np.flatnonzero(missing[b])]
            logger.warning("batch %r: %d of %d proteins treated as not measured (%s): %s",
                           str(batches[b]), len(absent), len(names), why, ", ".join(absent))
        if self.data.cell_protein_mask is not None:
            logger.warning("protein_mask %r: %d of %d cell-protein entries treated as not "
                           "measured", self.registry["protein_mask_obsm_key"],
                           int((~self.data.cell_protein_mask).sum()),
                           self.data.cell_protein_mask.size)

    def _background_options(self) -> dict:
        """Module arguments that follow from the registry: isotype controls (their column
        indices) and empty droplets; given only when registered, so module classes written
        before these options existed still build."""
        names = [str(p) for p in self.registry["protein_names"]]
        isotypes = registry_keys(self.registry, "isotype_controls")
        options = {}
        if isotypes:
            options["isotype_controls"] = [names.index(p) for p in isotypes]
        if self.data.droplets is not None:
            options["empty_droplets"] = True
        return options

    #: The module class built by default (``module_class=None``), here and in :meth:`load`.
    _module_cls: type[TotalVIModule] = TotalVIModule

    def _module_kwargs(self) -> dict:
        """Module arguments that follow from the registered data (none here; a subclass's module
        may need some, e.g. the number of labels). Not stored in ``init_params``."""
        return {}

    def __repr__(self) -> str:
        d = self.data
        return (f"{type(self).__name__}: {d.n_obs} cells, {d.n_genes} genes, {d.n_proteins} proteins, "
                f"{d.n_batches} batches, {d.n_covariates} covariate columns, "
                f"n_latent={self.module.n_latent}, "
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
        protein_mask=None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        isotype_controls: Sequence[str] | None = None,
        empty_droplets: AnnData | None = None,
    ) -> None:
        """Validate ``adata`` and register where its counts, batches and covariates are.

        Writes only ``adata.uns["_pyro_totalvi"]`` (plain strings, lists and booleans: it survives
        ``write_h5ad`` and goes into a saved model's ``settings.json``). Raises on NaN, infinite or
        negative counts, on a protein table whose cell names differ from ``adata.obs_names``, on
        missing keys, on cells without RNA counts and on missing covariate values; each message
        names the offending column, feature or cell.

        Parameters
        ----------
        protein_expression_obsm_key
            ``adata.obsm`` key of the protein counts (DataFrame or array, cells x proteins).
        batch_key
            ``adata.obs`` column of batches (``s`` in the model); ``None`` for one batch.
            ``transform_batch`` in queries refers to these categories only.
        layer
            Layer of RNA counts; ``None`` for ``adata.X``.
        non_integer
            Non-integer counts give a warning (``"warn"``) or an error (``"error"``).
        protein_mask
            Which proteins were measured (``True``) where; unmeasured entries are left out of
            the likelihood and of the encoder's input. A DataFrame (rows: batch categories,
            columns: protein names) or array of shape (batches, proteins) in the order of the
            batch categories; or the name of an ``adata.obsm`` key holding a cells x proteins
            mask (e.g. ``"protein_measured"``). ``None``: a protein with zero counts in every
            cell of a batch is taken as not measured in that batch.
        categorical_covariate_keys
            ``adata.obs`` columns given, one-hot encoded, to the networks besides the batch
            (categories are recorded; a query with a category unseen here raises).
        continuous_covariate_keys
            Numeric ``adata.obs`` columns given as they are to the networks (no NaN/inf).
        isotype_controls
            Protein names of isotype-control antibodies (they measure background only): they
            are modelled as background in every cell (``v = 1``) and inform a per-cell
            background shift shared by all proteins (README, "Protein background"). Unknown or
            repeated names, or every protein, raise :class:`~pyro_totalvi.TotalVIDataError`.
        empty_droplets
            An AnnData of empty droplets (ambient antibody, no cell), e.g. from the raw
            (unfiltered) 10x matrix: protein counts in ``obsm[protein_expression_obsm_key]``
            with the same proteins (a DataFrame with their names, in any order, or an array in
            the cells' order), non-negative integers, and ``obs[batch_key]`` when the cells have
            batches, with at least 10 droplets per batch. Their counts inform the per-protein
            background prior of Eq. (11). The counts are copied into the registry (so a saved
            model carries them); the AnnData itself is not modified.
        """
        register_anndata(adata, protein_expression_obsm_key, batch_key, layer, non_integer,
                         protein_mask=protein_mask,
                         categorical_covariate_keys=categorical_covariate_keys,
                         continuous_covariate_keys=continuous_covariate_keys,
                         isotype_controls=isotype_controls, empty_droplets=empty_droplets)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        protein_mask=None,
        modalities: dict[str, str] | None = None,
        non_integer: Literal["warn", "error"] = "warn",
        isotype_controls: Sequence[str] | None = None,
        empty_droplets: AnnData | None = None,
    ) -> None:
        """Register a ``mudata.MuData`` with RNA and protein modalities (scvi-tools' signature).

        Writes only ``mdata.uns["_pyro_totalvi"]``. The model works on an AnnData built from it:
        the RNA modality's counts (``rna_layer``, ``None``: ``.X``) and ``obs``, with the protein
        modality's counts (``protein_layer``) as a cells x proteins DataFrame in
        ``obsm["protein_expression"]``. Both modalities must hold the same cells
        (``mudata.pp.intersect_obs(mdata)`` first otherwise); proteins are reordered to the RNA
        modality's cells.

        Parameters
        ----------
        modalities
            Which modality holds each argument, e.g. ``{"rna_layer": "rna", "protein_layer":
            "prot", "batch_key": "rna"}`` (the default). ``batch_key`` and covariate keys are
            ``obs`` columns of the modality named here, or of ``mdata.obs`` when it names none;
            a ``protein_mask`` obsm key is looked up in the protein modality.
        batch_key, categorical_covariate_keys, continuous_covariate_keys, protein_mask
            As in :meth:`setup_anndata`.
        isotype_controls
            Names of the protein modality's isotype controls, as in :meth:`setup_anndata`.
        empty_droplets
            Empty droplets as an AnnData shaped like the protein modality (protein counts in
            ``X``, protein names as ``var_names``, ``obs[batch_key]`` when there are batches),
            or with the counts in ``obsm["protein_expression"]``; see :meth:`setup_anndata`.
        """
        if modalities is None:
            modalities = {"rna_layer": "rna", "protein_layer": "prot", "batch_key": "rna"}
        register_mudata(mdata, rna_layer, protein_layer, batch_key, categorical_covariate_keys,
                        continuous_covariate_keys, protein_mask, modalities, non_integer,
                        isotype_controls=isotype_controls, empty_droplets=empty_droplets)

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
        strategy: str | None = None,
        accelerator: str = "auto",
        device: int | str | torch.device = "auto",
        adversarial_classifier: bool | None = None,
        plan_kwargs: dict | None = None,
        **kwargs,
    ) -> TOTALVI:
        """Train by minibatch SVI; see :func:`pyro_totalvi.train.train` for ``**kwargs``.

        ``plan_kwargs``: scvi-tools' training-plan settings, e.g. ``dict(weight_decay=0.0)``
        (as for a query model, :meth:`load_query_data`); the keys ``lr``, ``weight_decay``,
        ``eps``, ``n_steps_kl_warmup``, ``reduce_lr_on_plateau``, ``lr_patience`` and
        ``lr_factor`` are passed to :func:`~pyro_totalvi.train.train` (``lr`` there replaces
        the ``lr`` argument).

        The per-epoch history (ELBO, reconstruction, KL on training and validation cells) is
        stored in :attr:`history`.

        With ``checkpoint_dir``, a checkpoint (parameters, optimiser, RNG states, history, ...)
        is written atomically to ``checkpoint_dir/checkpoint.pt`` every ``checkpoint_every``
        epochs and at the end. After an interruption, ``TOTALVI(adata, <same settings>)
        .train(<same arguments>, checkpoint_dir=..., resume=True)`` continues from it and ends
        exactly as the uninterrupted run would have; other data or settings raise.

        ``strategy="ddp"``: data-parallel training over the processes started by ``torchrun``
        (``batch_size`` per process; see :func:`pyro_totalvi.train.train` and the README section
        "Training on several GPUs or machines"). Default ``None``: this process alone.

        ``accelerator`` (``"auto"``, ``"cpu"``, ``"gpu"``, ``"mps"``) and ``device`` (``"auto"``,
        an index or ``"cuda:1"``) choose where to train, as in scvi-tools; ``"auto"`` takes a CUDA
        GPU when torch sees one. The model stays there afterwards (see :meth:`to_device`):
        queries run on the same device and return NumPy arrays / DataFrames as on the CPU.

        ``adversarial_classifier``: train an adversarial batch classifier on the latent space
        during the KL warm-up (:mod:`pyro_totalvi.adversarial`). ``None`` means off here, unlike
        scvi-tools, which turns it on when some proteins are not measured in some batch
        (:meth:`scvi_adversarial_rule`): measured on two real data sets with hidden proteins
        (``benchmarks/adversarial.py``, README "Adversarial batch classifier") it lowered the
        imputation of the missing proteins and mixed batches only on one of them.
        """
        unknown = sorted(set(plan_kwargs or {}) - set(PLAN_KEYS))
        if unknown:
            raise ValueError(f"plan_kwargs {unknown} are not supported; known: {list(PLAN_KEYS)}")
        kwargs = {**(plan_kwargs or {}), **kwargs}
        lr = kwargs.pop("lr", lr)
        if strategy == "ddp":
            distributed.init_distributed()  # first: it picks this process's GPU (LOCAL_RANK)
        self.module.to(resolve_device(accelerator, device))
        if adversarial_classifier is None:
            adversarial_classifier = False  # measured choice; see the docstring
        history, split = train(self.module, self.data, max_epochs=max_epochs, lr=lr,
                               batch_size=batch_size, train_size=train_size,
                               early_stopping=early_stopping, seed=seed,
                               progress_bar=progress_bar, checkpoint_dir=checkpoint_dir,
                               checkpoint_every=checkpoint_every, resume=resume,
                               strategy=strategy, adversarial_classifier=adversarial_classifier,
                               **kwargs)
        self.history = history if self.history is None else pd.concat([self.history, history])
        self.split = split
        self.is_trained = True
        return self

    def scvi_adversarial_rule(self) -> bool:
        """What scvi-tools' ``train(adversarial_classifier=None)`` would choose for these data: on
        when some protein is not measured in some batch (batch panels or a cell-level
        ``protein_mask``). This package's ``None`` means off (see :meth:`train`)."""
        partial = self.data.cell_protein_mask is not None and not self.data.cell_protein_mask.all()
        return bool(self.data.n_batches > 1 and ((~self.data.protein_measured).any() or partial))

    @property
    def device(self) -> torch.device:
        """The device that holds the model's parameters (where training and queries run)."""
        return module_device(self.module)

    def to_device(self, device: int | str | torch.device) -> TOTALVI:
        """Move the model to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, an index, ...)."""
        self.module.to(resolve_device("gpu" if isinstance(device, int) else "auto", device))
        return self

    # ------------------------------------------------------------------------------------------
    def _data(self, adata: AnnData | None) -> CiteData:
        """The data for a query: training data, or ``adata`` (AnnData or MuData) checked against
        the registry."""
        if adata is None or adata is self.adata or (self.mdata is not None and adata is self.mdata):
            return self.data
        if is_mudata(adata):
            if "mudata" not in self.registry:
                raise TotalVIDataError("this model was set up with an AnnData; pass an AnnData")
            adata = anndata_from_mudata(adata, self.registry)
        var_names = list(self.adata.var_names)
        if list(adata.var_names) != var_names:
            extra = sorted(set(adata.var_names) - set(var_names))[:5]
            absent = sorted(set(var_names) - set(adata.var_names))[:5]
            raise TotalVIDataError(
                "adata genes differ from the training data "
                f"(n={adata.n_vars} vs {len(var_names)}; unknown: {extra}, missing: {absent}); "
                "subset and order them as adata_train.var_names"
            )
        return CiteData(adata, self.registry, extras=self.module.extra_inputs)

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
            "model_class": type(self).__name__,
            "init_params": self.init_params,
            "registry": _jsonable(self.registry),
            "var_names": list(map(str, self.adata.var_names)),
            "is_trained": self.is_trained,
        }
        atomic_write(path / "settings.json",
                     lambda f: f.write(json.dumps(settings, indent=1).encode()))
        state = {k: v.cpu() for k, v in self.module.state_dict().items()}  # loadable without a GPU
        atomic_write(path / "params.pt", lambda f: torch.save(state, f))
        if self.history is not None:
            atomic_write(path / "history.csv", lambda f: f.write(self.history.to_csv().encode()))
        elif (path / "history.csv").exists():  # overwrite=True: not another model's history
            (path / "history.csv").unlink()

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData,
             module_class: type[TotalVIModule] | None = None, accelerator: str = "auto",
             device: int | str | torch.device = "auto") -> TOTALVI:
        """Load a saved model for ``adata``; genes, proteins and batches must match the saved ones.

        ``adata`` is registered with the saved settings if it is not registered yet. A model
        trained with ``TOTALVI(..., module_class=C)`` loads with ``module_class=C``. The model is
        put on the device that ``accelerator`` and ``device`` name (as in :meth:`train`); a model
        saved on a GPU loads on a CPU-only machine.
        """
        path = Path(dir_path)
        user_registry = adata.uns.get(REGISTRY_KEY)  # put back afterwards, untouched
        settings, params = read_saved_model(path)
        saved_class = settings.get("model_class", "TOTALVI")
        if saved_class not in {c.__name__ for c in cls.__mro__}:
            raise ValueError(f"{path} holds a {saved_class} model; load it with "
                             f"{saved_class}.load")
        reg = settings["registry"]
        if is_mudata(adata):
            if "mudata" not in reg:
                raise TotalVIDataError(f"{path} was saved from an AnnData; pass an AnnData")
            rna = anndata_from_mudata(adata, reg)
            if list(map(str, rna.var_names)) != settings["var_names"]:
                raise TotalVIDataError(f"mdata genes differ from the saved model's "
                                       f"({rna.n_vars} vs {len(settings['var_names'])} genes)")
            if REGISTRY_KEY not in adata.uns:
                m = reg["mudata"]
                register_mudata(adata, m["rna_layer"], m["protein_layer"], reg["batch_key"],
                                registry_keys(reg, "categorical_covariate_keys"),
                                registry_keys(reg, "continuous_covariate_keys"),
                                reg.get("protein_mask_obsm_key"), m["modalities"])
        else:
            if list(map(str, adata.var_names)) != settings["var_names"]:
                raise TotalVIDataError(f"adata genes differ from the saved model's "
                                       f"({adata.n_vars} vs {len(settings['var_names'])} genes)")
            if REGISTRY_KEY not in adata.uns:
                register_like(adata, reg)
        saved_cats, cats = reg["batch_categories"], list(adata.uns[REGISTRY_KEY]["batch_categories"])
        if not set(cats) <= set(saved_cats):
            raise TotalVIDataError(f"adata has batches unseen by the saved model: "
                                   f"{sorted(set(cats) - set(saved_cats))}")
        init = dict(settings["init_params"])
        init["empirical_protein_background_prior"] = False  # parameters come from the file
        # The model reads its registry from uns: the saved one, so that codes follow the saved
        # categories. A registration the user made is put back; a new one keeps the saved.
        adata.uns[REGISTRY_KEY] = dict(reg)
        try:
            model = cls(adata, module_class=module_class, **init)
        finally:
            if user_registry is not None:
                adata.uns[REGISTRY_KEY] = user_registry
        model.init_params = settings["init_params"]
        model.module.load_state_dict(params)
        model.module.to(resolve_device(accelerator, device))
        model.module.eval()
        model.is_trained = settings["is_trained"]
        if (path / "history.csv").exists():
            model.history = pd.read_csv(path / "history.csv", index_col=0)
        return model


def _jsonable(value):
    """The registry as JSON: arrays (as ``uns`` gives them back after ``read_h5ad``) become
    lists, numpy scalars Python scalars; booleans stay booleans, other leaves become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return value.item() if isinstance(value, np.generic) else value
    return str(value)

