"""The user-facing ``TOTALVI`` class, called as scvi-tools' TOTALVI is."""

from __future__ import annotations

import inspect
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

from . import compat, distributed
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
        Initialise c, d of Eq. (11) from per-batch (per-panel) Gaussian mixtures; default: when
        there are more than 10 proteins (as scvi-tools).
    override_missing_proteins
        ``True``: a protein with zero counts in every cell of a batch is still taken as measured
        there (scvi-tools' option); a ``protein_mask`` given at setup applies either way.
    seed
        Seeds the initial network weights (the global torch RNG is left as it was).
    module_class
        A subclass of :class:`~pyro_totalvi.TotalVIModule` (e.g. with another likelihood in an
        overridden ``model``) built with the same arguments; training, queries and
        ``load(..., module_class=)`` then use it. Default: the class's ``_module_cls``.
    **model_kwargs
        ``n_hidden``, ``n_layers_encoder``, ``dropout_rate_encoder``, ``dropout_rate_decoder``,
        ``encode_covariates`` (default ``True``; ``False``: the encoder sees neither the batch nor
        the covariates, as in scvi-tools), ``protein_warmup`` (default ``True``: the KL warm-up
        weight also multiplies the protein likelihood, as in scvi-tools 1.4),
        ``background_preference`` (default 0.1), ``min_foreground_ratio`` (default 3),
        ``background_cell_scale`` (default ``True``; see README, "Protein background"; isotype
        controls and empty droplets come from the registry, :meth:`setup_anndata`),
        ``scale_encoder_input`` (default ``False``; ``True``: the encoder's input is scaled per
        cell as scvi-tools 1.4 does, which maps RNA-only queries much better),
        ``encoder_protein_dropout`` (default 0; e.g. 0.5 for a reference meant for RNA-only
        queries: in training, that fraction of cells is encoded without its proteins, README
        "Mapping new data onto a reference") and
        ``modality_weights`` (``{"rna": a, "protein": b}``, default 1 and 1: train on the
        tempered posterior with the RNA likelihood to the power ``a`` and the protein likelihood
        to the power ``b``; saved with the model; see :meth:`get_modality_contributions`); see
        :class:`~pyro_totalvi.TotalVIModule`. scvi-tools' ``gene_likelihood``,
        ``gene_dispersion``, ``protein_dispersion``, ``latent_distribution``,
        ``use_batch_norm``, ``use_layer_norm``, ``log_variational`` and ``n_layers_decoder`` are
        accepted at the one value implemented here (scvi-tools' default) and refused otherwise
        (:data:`pyro_totalvi.compat.MODULE_CHOICES`); an unknown name raises ``TypeError``
        listing the accepted ones.

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
        override_missing_proteins: bool = False,
        seed: int = 0,
        module_class: type[TotalVIModule] | None = None,
        **model_kwargs,
    ):
        module_class = module_class or self._module_cls
        network_kwargs = compat.model_settings(model_kwargs, module_class)
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
        self.override_missing_proteins = bool(override_missing_proteins)
        self.data = CiteData(adata, extras=module_class.extra_inputs,
                             override_missing_proteins=self.override_missing_proteins)
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
        if self.override_missing_proteins:
            self.init_params["override_missing_proteins"] = True
        self._warn_masked_proteins()
        with rng_scope(seed):  # the initial weights; the caller's generators are left as they were
            self.module = self._build_module(module_class, network_kwargs)
        if "modality_weights" in self.init_params:  # validated floats: JSON-safe in save()
            self.init_params["modality_weights"] = dict(self.module.modality_weights)
        self.history: pd.DataFrame | None = None
        self.is_trained = False
        #: ``{"train", "validation", "test"}`` cell indices of the last training run
        self.split: dict | None = None

    def _build_module(self, module_class: type[TotalVIModule], network_kwargs: dict
                      ) -> TotalVIModule:
        """The module for the registered data: library priors, the empirical background prior
        (one per panel), and the panel / size-factor / background options and the subclass's
        :meth:`_module_kwargs` only when registered (so that subclasses written without them
        keep working)."""
        l_mu, l_var = library_log_stats(self.data)
        prior_mean = prior_scale = None
        if self.init_params["empirical_protein_background_prior"]:
            prior_mean, prior_scale = map(torch.from_numpy, protein_background_prior(self.data))
        extra = dict(self._background_options(), **self._module_kwargs())
        if self.data.has_panels:
            extra["n_panels"] = self.data.n_panels
        if self.registry.get("size_factor_key") is not None:
            extra["use_size_factor_key"] = True
        return module_class(
            self.data.n_genes,
            self.data.n_proteins,
            self.data.n_batches,
            n_covariates=self.data.n_covariates,
            n_latent=self.init_params["n_latent"],
            protein_mixture=self.init_params["protein_mixture"],
            use_observed_lib_size=self.init_params["use_observed_lib_size"],
            library_log_means=torch.from_numpy(l_mu),
            library_log_vars=torch.from_numpy(l_var),
            background_prior_mean=prior_mean,
            background_prior_scale=prior_scale,
            **network_kwargs,
            **extra,
        )

    # -- scvi-tools' model attributes ------------------------------------------------------------
    @property
    def train_indices(self) -> np.ndarray | None:
        """Cells (indices into :attr:`adata`) that trained, as scvi-tools; ``None`` before
        training."""
        return None if self.split is None else self.split["train"]

    @property
    def validation_indices(self) -> np.ndarray | None:
        """Cells of the validation set (``train(train_size=, validation_size=)``)."""
        return None if self.split is None else self.split["validation"]

    @property
    def test_indices(self) -> np.ndarray | None:
        """Cells in neither set (when ``train_size + validation_size < 1``); empty otherwise."""
        return None if self.split is None else self.split.get("test", np.zeros(0, np.int64))

    @property
    def summary_string(self) -> str:
        """What the model is and whether it is trained (scvi-tools' ``summary_string``)."""
        d, m = self.data, self.module
        params = ", ".join(f"{k}: {v}" for k, v in self.init_params.items())
        name = "TotalVI" if type(self) is TOTALVI else type(self).__name__
        return (f"{name} Model (pyro_totalvi, {type(m).__name__}) with the "
                f"following params: \n{params}\nData: {d.n_obs} cells, {d.n_genes} genes, "
                f"{d.n_proteins} proteins, {d.n_batches} batches, {d.n_covariates} covariate "
                f"columns\nTraining status: {'Trained' if self.is_trained else 'Not Trained'}")

    def _warn_masked_proteins(self) -> None:
        """One warning per batch (per panel with a ``panel_key``) naming the proteins left out of
        its likelihood."""
        missing = ~self.data.protein_measured
        names, batches = self.registry["protein_names"], self.data.panel_categories
        what = "panel" if self.data.has_panels else "batch"
        user_mask = (self.registry.get("protein_mask") is not None
                     or self.registry.get("protein_mask_obsm_key") is not None)
        why = ("as protein_mask says" if user_mask else
               "all zero in every cell there; pass protein_mask to say which were measured")
        for b in np.flatnonzero(missing.any(axis=1)):
            absent = [str(names[t]) for t in np.flatnonzero(missing[b])]
            logger.warning("%s %r: %d of %d proteins treated as not measured (%s): %s",
                           what, str(batches[b]), len(absent), len(names), why, ", ".join(absent))
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
        # scvi-tools prints the summary and returns ""; returning it shows the same text
        return self.summary_string

    def view_anndata_setup(self, adata: AnnData | None = None,
                           hide_state_registries: bool = False) -> None:
        """Print how ``adata`` (default: the model's) was registered: the setup arguments and
        what they found (cells, genes, proteins, batches, panels, masked proteins, ...)."""
        if adata is None:
            registry, data = self.registry, self.data
        else:
            if REGISTRY_KEY not in adata.uns:
                raise ValueError("Given AnnData not setup with TOTALVI (no "
                                 f"adata.uns[{REGISTRY_KEY!r}]). Cannot view setup summary.")
            data = self._data(adata)
            registry = dict(adata.uns[REGISTRY_KEY])
        print(_setup_text(registry, data, hide_state_registries))

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the setup arguments of a model saved in ``dir_path`` (as scvi-tools)."""
        path = Path(dir_path) / f"{prefix or ''}settings.json"
        registry = json.loads(path.read_text())["registry"]
        print(_setup_text(registry, None, True))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        protein_expression_obsm_key: str = "protein_expression",
        protein_names_uns_key: str | None = None,
        batch_key: str | None = None,
        panel_key: str | None = None,
        layer: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        non_integer: Literal["warn", "error"] = "warn",
        protein_mask=None,
        isotype_controls: Sequence[str] | None = None,
        empty_droplets: AnnData | None = None,
    ) -> None:
        """Validate ``adata`` and register where its counts, batches and covariates are.

        Writes only ``adata.uns["_pyro_totalvi"]`` (plain strings, lists and booleans: it survives
        ``write_h5ad`` and goes into a saved model's ``settings.json``). Raises on NaN, infinite or
        negative counts, on a protein table whose cell names differ from ``adata.obs_names``, on
        missing keys, on cells without RNA counts and on missing covariate values; each message
        names the offending column, feature or cell.

        The arguments are scvi-tools' (same names and order), then this package's.

        Parameters
        ----------
        protein_expression_obsm_key
            ``adata.obsm`` key of the protein counts (DataFrame or array, cells x proteins).
        protein_names_uns_key
            ``adata.uns`` key of the protein names (one per column); ``None``: the columns of a
            DataFrame, else ``"0"``, ``"1"``, ... (as scvi-tools).
        batch_key
            ``adata.obs`` column of batches (``s`` in the model); ``None`` for one batch.
            ``transform_batch`` in queries refers to these categories only.
        panel_key
            ``adata.obs`` column of the antibody panel each cell was measured with (as
            scvi-tools): the background prior of Eq. (11) has one ``c_t, d_t`` per panel
            instead of per batch, and a protein with zero counts in every cell of a *panel* is
            taken as not measured there. The networks still see the batch.
        layer
            Layer of RNA counts; ``None`` for ``adata.X``.
        size_factor_key
            ``adata.obs`` column of per-cell size factors (finite, > 0): the (observed) library
            ``l_n`` of Eq. (10) instead of the total counts, and ``rho`` is the softplus of the
            decoder's output (not on the simplex), as scvi-tools' ``use_size_factor_key``.
        non_integer
            Non-integer counts give a warning (``"warn"``) or an error (``"error"``).
        protein_mask
            Which proteins were measured (``True``) where; unmeasured entries are left out of
            the likelihood and of the encoder's input. A DataFrame (rows: batch, or with
            ``panel_key`` panel, categories; columns: protein names) or array in that order; or
            an ``adata.obsm`` key of a cells x proteins mask. ``None``: a protein with zero
            counts in every cell of a batch (panel) is taken as not measured there.
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
            An AnnData of empty droplets (ambient antibody, no cell; e.g. from the raw 10x
            matrix): the cells' proteins in ``obsm[protein_expression_obsm_key]`` (a DataFrame
            with their names, or an array in the cells' order), non-negative integers, and
            ``obs[batch_key]`` with at least 10 droplets per batch. They inform the background
            prior of Eq. (11); their counts are copied into the registry. Not with ``panel_key``
            (the droplets have a batch, not a panel).
        """
        register_anndata(adata, protein_expression_obsm_key, batch_key, layer, non_integer,
                         protein_mask=protein_mask,
                         categorical_covariate_keys=categorical_covariate_keys,
                         continuous_covariate_keys=continuous_covariate_keys,
                         protein_names_uns_key=protein_names_uns_key, panel_key=panel_key,
                         size_factor_key=size_factor_key, isotype_controls=isotype_controls,
                         empty_droplets=empty_droplets)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        panel_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        modalities: dict[str, str] | None = None,
        protein_mask=None,
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
            a ``protein_mask`` obsm key is looked up in the protein modality; ``panel_key`` in
            ``batch_key``'s modality unless ``modalities`` names one for it (as scvi-tools).
        batch_key, panel_key, size_factor_key, categorical_covariate_keys, \
continuous_covariate_keys, protein_mask
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
                        panel_key=panel_key, size_factor_key=size_factor_key,
                        isotype_controls=isotype_controls, empty_droplets=empty_droplets)

    # ------------------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 4e-3,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 256,
        early_stopping: bool = True,
        check_val_every_n_epoch: int | None = None,
        reduce_lr_on_plateau: bool = True,
        n_steps_kl_warmup: int | None = None,
        n_epochs_kl_warmup: int | None = None,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        external_indexing: list | None = None,
        seed: int = 0,
        progress_bar: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        strategy: str | None = None,
        device: int | str | torch.device = "auto",
        adversarial_classifier: bool | None = None,
        **kwargs,
    ) -> TOTALVI:
        """Train by minibatch SVI: scvi-tools' ``TOTALVI.train`` arguments, then this package's.

        Stores the per-epoch :attr:`history` and the split (:attr:`train_indices`,
        :attr:`validation_indices`, :attr:`test_indices`). The README ("Use from Python")
        describes every argument: the split (``train_size``, ``validation_size``,
        ``shuffle_set_split``, ``external_indexing``) follows scvi-tools' rule;
        ``check_val_every_n_epoch`` (default: every epoch); warm-up in steps or (taking
        precedence) epochs; ``plan_kwargs`` (``lr``, ``weight_decay``, ``eps``, ``optimizer``,
        ``lr_*``, ``*_kl_weight``, ...) are used unless the same setting is passed explicitly;
        ``datasplitter_kwargs`` (split settings; DataLoader settings warn); ``devices`` as
        Lightning's (one device per process) or ``device`` (an index or ``"cuda:1"``);
        ``**kwargs``: ``early_stopping_patience``, ``early_stopping_monitor``,
        ``early_stopping_min_delta``, ``enable_progress_bar``, Lightning display settings (no
        effect), the ``plan_kwargs`` names; anything else raises ``TypeError`` listing the
        accepted names (:func:`pyro_totalvi.compat.train_settings`).

        ``seed`` seeds the split, the minibatch order and every draw. With ``checkpoint_dir``,
        ``checkpoint_dir/checkpoint.pt`` is written atomically every ``checkpoint_every`` epochs
        and at the end; ``TOTALVI(adata, <same settings>).train(<same arguments>,
        checkpoint_dir=..., resume=True)`` continues and ends exactly as the uninterrupted run.
        ``strategy="ddp"``: data-parallel over the processes started by ``torchrun`` (README).
        The model stays on the training device (:meth:`to_device`). Returns the model.

        ``adversarial_classifier``: a batch classifier on z in the KL warm-up
        (:mod:`pyro_totalvi.adversarial`); ``None``: off, unlike scvi-tools (README, measured).
        """
        defaults = {k: p.default for cls in (TOTALVI, type(self))  # a subclass's defaults too
                    for k, p in inspect.signature(cls.train).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        args = dict(max_epochs=max_epochs, lr=lr, train_size=train_size,
                    validation_size=validation_size, shuffle_set_split=shuffle_set_split,
                    batch_size=batch_size, early_stopping=early_stopping,
                    check_val_every_n_epoch=check_val_every_n_epoch,
                    reduce_lr_on_plateau=reduce_lr_on_plateau,
                    n_steps_kl_warmup=n_steps_kl_warmup, n_epochs_kl_warmup=n_epochs_kl_warmup,
                    external_indexing=external_indexing, seed=seed, progress_bar=progress_bar,
                    checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                    resume=resume, strategy=strategy,
                    # None: off here (a measured choice; see above), unlike scvi-tools
                    adversarial_classifier=bool(adversarial_classifier))
        settings = compat.train_settings(args, defaults, plan_kwargs, datasplitter_kwargs, kwargs)
        device = compat.devices_to_device(devices, device)
        if strategy == "ddp":
            distributed.init_distributed()  # first: it picks this process's GPU (LOCAL_RANK)
        self.module.to(resolve_device(accelerator, device))
        # the run seeds its own draws (rng_scope in Trainer.run): no global reseeding here
        history, split = train(self.module, self.data, **settings)
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
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Write ``settings.json`` (format version, settings, names), ``params.pt``, the split
        (``indices.npz``) and the training history (``history.csv``), each name preceded by
        ``prefix``; with ``save_anndata``, also the data (``adata.h5ad``, or ``mdata.h5mu`` for
        a MuData) so that :meth:`load` needs no AnnData.

        Files are written to a temporary name and renamed, so an interrupted save never leaves a
        half-written model. ``dir_path`` must not hold this prefix's model already (without a
        prefix: must be empty or absent) unless ``overwrite``. ``save_kwargs`` go to
        :func:`torch.save`, ``anndata_write_kwargs`` to ``write_h5ad`` (e.g. ``compression``);
        ``legacy_mudata_format`` is accepted for scvi-tools compatibility and changes nothing
        (gene names are stored once, in ``settings.json``).
        """
        path, prefix = Path(dir_path), prefix or ""
        names = [f"{prefix}{n}" for n in ("settings.json", "params.pt")]
        taken = (any((path / n).exists() for n in names) if prefix
                 else path.exists() and any(path.iterdir()))
        if taken and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model"
                                  + ("" if prefix else " or other files")
                                  + "; pass overwrite=True or another directory")
        path.mkdir(parents=True, exist_ok=True)
        settings = {
            "format_version": MODEL_FORMAT_VERSION,
            "model_class": type(self).__name__,
            "init_params": self.init_params,
            "registry": _jsonable(self.registry),
            "var_names": list(map(str, self.adata.var_names)),
            "is_trained": self.is_trained,
        }
        atomic_write(path / names[0], lambda f: f.write(json.dumps(settings, indent=1).encode()))
        state = {k: v.cpu() for k, v in self.module.state_dict().items()}  # loadable without a GPU
        atomic_write(path / names[1], lambda f: torch.save(state, f, **(save_kwargs or {})))
        optional = {
            "history.csv": None if self.history is None else
            (lambda f: f.write(self.history.to_csv().encode())),
            "indices.npz": None if self.split is None else
            (lambda f: np.savez(f, **{k: np.asarray(v) for k, v in self.split.items()})),
        }
        for name, write in optional.items():
            if write is not None:
                atomic_write(path / f"{prefix}{name}", write)
            elif (path / f"{prefix}{name}").exists():  # overwrite=True: not another model's
                (path / f"{prefix}{name}").unlink()
        if save_anndata:
            self._save_data(path, prefix, anndata_write_kwargs)

    def _save_data(self, path: Path, prefix: str, write_kwargs: dict) -> None:
        """Write the model's AnnData (or MuData) beside it, with its registry, atomically."""
        data = self.adata if self.mdata is None else self.mdata
        name = f"{prefix}{'adata.h5ad' if self.mdata is None else 'mdata.h5mu'}"
        tmp = path / f".{name}.tmp"
        try:
            data.write(tmp, **write_kwargs)
            os.replace(tmp, path / name)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str | torch.device = "auto",
        prefix: str | None = None,
        module_class: type[TotalVIModule] | None = None,
    ) -> TOTALVI:
        """Load a saved model for ``adata``; genes, proteins and batches must match the saved ones.

        ``adata=None`` loads the data saved with the model (``save(..., save_anndata=True)``).
        ``adata`` is registered with the saved settings if it is not registered yet. A model
        trained with ``TOTALVI(..., module_class=C)`` loads with ``module_class=C``. The model is
        put on the device that ``accelerator`` and ``device`` name (as in :meth:`train`); a model
        saved on a GPU loads on a CPU-only machine. The training split and history come back
        with it (:attr:`validation_indices`, :attr:`history`).
        """
        path, prefix = Path(dir_path), prefix or ""
        settings, params = read_saved_model(path, prefix)
        saved_class = settings.get("model_class", "TOTALVI")
        if saved_class not in {c.__name__ for c in cls.__mro__}:
            raise ValueError(f"{path} holds a {saved_class} model; load it with "
                             f"{saved_class}.load")
        reg = settings["registry"]
        if adata is None:
            adata = _read_saved_data(path, prefix, "mudata" in reg)
        user_registry = adata.uns.get(REGISTRY_KEY)  # put back afterwards, untouched
        _register_for_load(path, settings, adata)
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
        if (path / f"{prefix}history.csv").exists():
            model.history = pd.read_csv(path / f"{prefix}history.csv", index_col=0)
        if (path / f"{prefix}indices.npz").exists():
            with np.load(path / f"{prefix}indices.npz") as split:
                model.split = {k: split[k] for k in split.files}
        return model


def _register_for_load(path: Path, settings: dict, adata) -> None:
    """Check ``adata`` (AnnData or MuData) against a saved model's genes and batches, and
    register it with the saved settings if it is not registered yet."""
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
                            reg.get("protein_mask_obsm_key"), m["modalities"],
                            panel_key=reg.get("panel_key"),
                            size_factor_key=reg.get("size_factor_key"))
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


def _read_saved_data(path: Path, prefix: str, is_mudata_model: bool):
    """The AnnData (or MuData) written by ``save(..., save_anndata=True)``."""
    name = f"{prefix}{'mdata.h5mu' if is_mudata_model else 'adata.h5ad'}"
    if not (path / name).exists():
        raise ValueError(f"no data saved with the model in {path} ({name} is absent): pass "
                         "adata=..., or save with save_anndata=True")
    if is_mudata_model:
        import mudata

        return mudata.read_h5mu(path / name)
    import anndata

    return anndata.read_h5ad(path / name)


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



def _setup_text(registry: dict, data: CiteData | None, brief: bool) -> str:
    """The registry as text: the setup arguments, then (with ``data``) what they found."""
    keys = ("protein_expression_obsm_key", "protein_names_uns_key", "batch_key", "panel_key",
            "layer", "size_factor_key", "categorical_covariate_keys",
            "continuous_covariate_keys", "protein_mask_obsm_key")
    how = "setup_mudata" if "mudata" in registry else "setup_anndata"
    lines = [f"Setup via `TOTALVI.{how}` (pyro_totalvi) with arguments:"]
    lines += [f"  {k}: {registry.get(k)!r}" for k in keys if k in registry]
    if "mudata" in registry:
        lines.append(f"  modalities: {dict(registry['mudata']['modalities'])!r}")
    if data is not None:
        lines.append(f"Summary: {data.n_obs} cells, {data.n_genes} genes, {data.n_proteins} "
                     f"proteins, {data.n_batches} batches, {data.n_panels} panels, "
                     f"{data.n_covariates} covariate columns")
        n_missing = int((~data.protein_measured).sum())
        lines.append(f"Proteins not measured: {n_missing} (panel, protein) pairs")
    if not brief:
        lines.append(f"  batch categories: {list(registry['batch_categories'])}")
        lines.append(f"  proteins: {list(registry['protein_names'])}")
        if registry.get("panel_categories") is not None:
            lines.append(f"  panel categories: {list(registry['panel_categories'])}")
    return "\n".join(lines)
