"""``TOTALANVI``: totalVI with cell-type labels in the model, called as scvi-tools' TOTALANVI.

The model is :class:`~pyro_totalvi.labels.TotalANVIModule` (equations there); this class adds the
labels to the registration, ``predict``, ``from_totalvi_model`` and the classification weight of
training. Every TOTALVI query (latent space, normalized expression, DE, ELBO, save / load, ...)
is inherited unchanged.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .api import TOTALVI
from .data import REGISTRY_KEY, TotalVIDataError, is_mudata, register_obs_codes
from .labels import TotalANVIModule
from .train import default_max_epochs

__all__ = ["TOTALANVI"]

logger = logging.getLogger("pyro_totalvi")


def _register_labels(adata: AnnData, labels_key: str | None, unlabeled_category) -> dict:
    """Validate the label column (before anything is written) and return its registry entry."""
    if labels_key is None:
        raise ValueError("TOTALANVI needs labels_key: the adata.obs column of cell-type labels")
    scratch: dict = {}
    spec = register_obs_codes(adata, scratch, "labels", labels_key, unlabeled_category,
                              "labels_key")
    values = adata.obs[labels_key].astype(str)
    if unlabeled_category is not None and str(unlabeled_category) not in set(values):
        logger.info("unlabeled_category %r does not occur in adata.obs[%r]: every cell is "
                    "labelled", unlabeled_category, labels_key)
    if len(spec["categories"]) == 1:
        warnings.warn(f"adata.obs[{labels_key!r}] holds one label only "
                      f"({spec['categories'][0]!r}): predict() returns it for every cell",
                      UserWarning, stacklevel=3)
    return spec


class TOTALANVI(TOTALVI):
    """totalVI with cell-type labels: semi-supervised, ``predict()`` for the unlabelled cells.

    Register with :meth:`setup_anndata` (``labels_key``, ``unlabeled_category``), then
    ``TOTALANVI(adata).train()``; or start from a trained TOTALVI with
    :meth:`from_totalvi_model`. The model (a label :math:`c_n` per cell, with a Gaussian of its own
    in the latent space, observed where known and enumerated where not) is
    :class:`~pyro_totalvi.labels.TotalANVIModule`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Dimension of z.
    linear_classifier
        q(c | x, y, s) as one linear map of E_q[z] instead of an MLP (as scvi-tools).
    latent_kl_warmup
        Whether the KL warm-up also scales p(c) p(z | c) and q(z) (default ``False``: full
        weight, as scvi-tools' TOTALANVI; see :class:`~pyro_totalvi.labels.TotalANVIModule`).
    **kwargs
        As :class:`~pyro_totalvi.TOTALVI` (``protein_mixture``, network sizes, ``seed``, ...).

    Notes
    -----
    AnnData only (scvi-tools 1.4.2's ``TOTALANVI.setup_mudata`` takes no labels either).
    ``get_marginal_ll`` averages the label of an unlabelled cell under q(c | x, y, s) within
    each importance draw (as the ELBO does), so for these cells it is a bound below
    :math:`\\log p(x, y)`, not a consistent estimate of it.

    Examples
    --------
    >>> TOTALANVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type",
    ...                         unlabeled_category="Unknown")
    >>> model = TOTALANVI(adata)
    >>> model.train()
    >>> adata.obs["predicted"] = model.predict()
    """

    _module_cls = TotalANVIModule

    def __init__(self, adata: AnnData, n_latent: int = 20, linear_classifier: bool = False,
                 **kwargs):
        if is_mudata(adata):
            raise TotalVIDataError("TOTALANVI takes an AnnData registered with "
                                   "TOTALANVI.setup_anndata (labels_key is an adata.obs column)")
        extras = adata.uns.get(REGISTRY_KEY, {}).get("extras") or {}
        if "labels" not in extras:
            raise TotalVIDataError(
                "adata has no labels registered: call TOTALANVI.setup_anndata(adata, ..., "
                "labels_key=..., unlabeled_category=...) first")
        super().__init__(adata, n_latent=n_latent, linear_classifier=linear_classifier,
                         **kwargs)
        #: set by :meth:`from_totalvi_model`; shortens the default training (as scvi-tools)
        self.was_pretrained = False

    def _module_kwargs(self) -> dict:
        return {"n_labels": len(self.labels_spec["categories"])}

    @property
    def labels_spec(self) -> dict:
        """The registered labels: ``obs_key``, ``categories`` (code order), ``missing``."""
        return self.registry["extras"]["labels"]

    @property
    def unlabeled_category_(self):
        """The value of the labels column that marks an unlabelled cell (scvi-tools' name)."""
        return self.labels_spec["missing"]

    @property
    def _label_mapping(self) -> list[str]:
        """Label categories in code order (scvi-tools' name)."""
        return [str(c) for c in self.labels_spec["categories"]]

    # ------------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(cls, adata: AnnData, *args, labels_key: str | None = None,
                      unlabeled_category: str | None = None, **kwargs) -> None:
        """:meth:`TOTALVI.setup_anndata <pyro_totalvi.TOTALVI.setup_anndata>` (every argument of
        it, passed through) plus the labels.

        Parameters
        ----------
        labels_key
            ``adata.obs`` column of cell-type labels (required).
        unlabeled_category
            The value in that column that marks an unlabelled cell. ``None``, or a value absent
            from the column: every cell is labelled (allowed; the model then is supervised).

        The label categories are those in the column besides ``unlabeled_category`` (in
        categorical order); a column with no other value raises, and one with a single label
        warns (``predict`` can only return that label). Later, an AnnData whose column holds a
        category unseen here raises naming it; one without the column counts as all unlabelled.
        Only ``adata.uns["_pyro_totalvi"]`` is written.
        """
        spec = _register_labels(adata, labels_key, unlabeled_category)  # checked before writing
        super().setup_anndata(adata, *args, **kwargs)
        adata.uns[REGISTRY_KEY] = {**adata.uns[REGISTRY_KEY], "extras": {"labels": spec}}

    @classmethod
    def setup_mudata(cls, *args, **kwargs):
        raise NotImplementedError("TOTALANVI takes an AnnData (as scvi-tools 1.4.2, whose "
                                  "TOTALANVI.setup_mudata registers no labels); use "
                                  "TOTALANVI.setup_anndata")

    @classmethod
    def from_totalvi_model(cls, totalvi_model: TOTALVI, unlabeled_category,
                           labels_key: str | None = None, adata: AnnData | None = None,
                           **totalanvi_kwargs) -> TOTALANVI:
        """A TOTALANVI that starts from a trained TOTALVI's weights (scvi-tools' signature).

        ``adata`` (default: the TOTALVI's) is registered with the TOTALVI's settings plus
        ``labels_key`` (default: the labels its registry already names) and
        ``unlabeled_category``. Every parameter of the TOTALVI is copied (the label model's own
        start at totalVI's prior, so the new model starts as the TOTALVI); the background prior
        of Eq. (11) (c, d) is kept fixed in training, as scvi-tools keeps its per-sample
        parameters. Arguments in ``totalanvi_kwargs`` that the TOTALVI already set are ignored
        with a warning; the new ones (e.g. ``linear_classifier``) are used.
        """
        if not totalvi_model.is_trained:
            raise ValueError("the TOTALVI model has not been trained yet")
        if totalvi_model.mdata is not None:
            raise TotalVIDataError("TOTALANVI takes an AnnData; the TOTALVI was set up with a "
                                   "MuData")
        if adata is None:
            adata = totalvi_model.adata
        elif adata is not totalvi_model.adata:
            totalvi_model._data(adata)  # genes, proteins, batches and covariates must match
        registry = copy.deepcopy(totalvi_model.registry)
        if labels_key is None:
            labels_key = ((registry.get("extras") or {}).get("labels") or {}).get("obs_key")
            if labels_key is None:
                raise ValueError("labels_key is needed: the TOTALVI model was set up without "
                                 "labels")
        spec = _register_labels(adata, labels_key, unlabeled_category)
        adata.uns[REGISTRY_KEY] = {**registry, "extras": {**(registry.get("extras") or {}),
                                                          "labels": spec}}
        for key in sorted(set(totalanvi_kwargs) & set(totalvi_model.init_params)):
            warnings.warn(f"ignoring {key}={totalanvi_kwargs.pop(key)!r}: the TOTALVI set it "
                          f"to {totalvi_model.init_params[key]!r}", UserWarning, stacklevel=2)
        init = {**totalvi_model.init_params, "empirical_protein_background_prior": False}
        model = cls(adata, **init, **totalanvi_kwargs)
        model.init_params = {**totalvi_model.init_params, **totalanvi_kwargs}
        missing, unexpected = model.module.load_state_dict(totalvi_model.module.state_dict(),
                                                           strict=False)
        if unexpected:
            raise ValueError(f"the TOTALVI's module has parameters a TotalANVIModule lacks: "
                             f"{unexpected[:5]}")
        model.module.background_c.requires_grad_(False)
        model.module.background_log_d.requires_grad_(False)
        model.module.to(totalvi_model.device)
        model.was_pretrained = True
        logger.info("from_totalvi_model: copied all TOTALVI parameters; new: %s", missing)
        return model

    # ------------------------------------------------------------------------------------------
    def train(self, max_epochs: int | None = None, classification_ratio: float = 50.0,
              lr: float = 1e-3, batch_size: int = 128, early_stopping: bool = False,
              reduce_lr_on_plateau: bool = False, n_epochs_kl_warmup: int | None = 400,
              **kwargs) -> TOTALANVI:
        """Train as :meth:`TOTALVI.train <pyro_totalvi.TOTALVI.train>` (same arguments), with the
        classification factor on the labelled cells, and scvi-tools' TOTALANVI defaults.

        Parameters
        ----------
        max_epochs
            Default as TOTALVI; after :meth:`from_totalvi_model`, a third of it, between 2 and
            10 (as scvi-tools).
        classification_ratio
            The training objective is the mean per-cell ELBO plus ``classification_ratio`` times
            the mean log q(label | x, y) of the labelled cells (scvi-tools' default 50): each
            labelled cell's factor is weighted by ``classification_ratio * n_cells /
            n_labelled``. 0 trains on the ELBO alone. Not part of any reported likelihood.
        lr, batch_size, early_stopping, reduce_lr_on_plateau, n_epochs_kl_warmup
            scvi-tools 1.4.2's TOTALANVI defaults (its semi-supervised training plan: Adam at
            1e-3, a KL warm-up over 400 epochs, which takes precedence over
            ``n_steps_kl_warmup`` unless set to ``None``; minibatches of 128, no early stopping,
            no learning-rate schedule), not TOTALVI's. ``plan_kwargs`` may override them.
            After :meth:`from_totalvi_model` the warm-up restarts from 0 as in scvi-tools, so
            the few fine-tuning epochs run at a small KL weight (keeping it at 1 there gave
            the same label-transfer accuracy in ``benchmarks/labels.py``: 0.485 vs 0.480).
        """
        n_labelled = int((self.data.extras["labels"] >= 0).sum())
        self.module.classification_weight = (
            float(classification_ratio) * self.data.n_obs / n_labelled if n_labelled else 0.0)
        if max_epochs is None and self.was_pretrained:
            max_epochs = int(min(10, max(2, round(default_max_epochs(self.data.n_obs) / 3))))
        return super().train(max_epochs, lr=lr, batch_size=batch_size,
                             early_stopping=early_stopping,
                             reduce_lr_on_plateau=reduce_lr_on_plateau,
                             n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)

    @torch.no_grad()
    def predict(self, adata: AnnData | None = None, indices=None, soft: bool = False,
                batch_size: int | None = None):
        """Cell types from the classifier q(c | x, y, s) at the encoder's mean.

        Returns
        -------
        ``soft=False``: an array of label names, one per cell; ``soft=True``: a DataFrame of
        probabilities, cells x labels. Labelled cells get the classifier's answer too (compare
        it with their label to check the model).
        """
        data, idx = self._prepare(adata, indices)
        probs = np.zeros((len(idx), self.module.n_labels), dtype=np.float32)
        for pos, mb in self._chunks(data, idx, batch_size):
            z_loc = self.module.encode(*mb.args())[0]
            probs[pos] = self.module.classify(z_loc).softmax(-1).cpu().numpy()
        if soft:
            return pd.DataFrame(probs, index=self._cell_names(adata, idx),
                                columns=self._label_mapping)
        return np.asarray(self._label_mapping, dtype=object)[probs.argmax(1)]
