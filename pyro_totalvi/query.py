r"""Reference mapping: map new data onto a trained model (scArches "architecture surgery").

A reference model is trained once on annotated CITE-seq data; a *query* (new donors, new
batches, often RNA only) is then mapped onto it without retraining the reference, with
scvi-tools' calls::

    TOTALVI.prepare_query_anndata(adata_query, model)       # genes (and proteins) as the reference's
    query = TOTALVI.load_query_data(adata_query, model)     # surgery + freezing
    query.train(200, plan_kwargs=dict(weight_decay=0.0))    # learns only what is left free
    query.get_latent_representation()                       # in the reference's latent space
    query.get_normalized_expression(transform_batch="ref")  # RNA-only query: imputed proteins

**What is padded** (:func:`transplant`). The networks read ``s ⊕ covariates`` (one-hot batch,
then the covariates) in every layer: each ``Linear`` of an :class:`~pyro_totalvi.nn.FCLayers`
has one weight column per batch category, appended to the layer's own input. The query
model's module is built for the reference's categories followed by the query's new ones
(codes of the reference's categories do not change); every tensor takes the reference's
values, and only the entries of new categories keep the new module's initialisation, as in
scvi-tools: new weight columns (``nn.Linear``'s uniform draw), new columns of
``background_c`` and ``background_log_d`` (Eq. 11; from the query's cells when the reference
used the empirical prior), new entries of the buffers ``library_log_means`` /
``library_log_vars`` (Eq. 5; the query's library sizes). New categories of categorical
covariates get new columns the same way. Which weights read the covariates is found from the
modules (every ``FCLayers`` with covariates), and per-batch tensors by their batch dimension,
so a subclass of :class:`~pyro_totalvi.TotalVIModule` with more networks is padded as well.

**What is blocked** (:func:`freeze`, with scvi-tools' flags). A parameter that the flags leave
fully trainable keeps ``requires_grad``; a parameter with new entries keeps it too and gets a
boolean mask in ``module.grad_masks`` (``True`` = new entry); every other parameter gets
``requires_grad=False`` and never reaches the optimiser. Defaults: only the new columns
train, plus the BatchNorm scale and shift of the generative side (``freeze_batchnorm_decoder
=False``, as scvi-tools; the background networks q(beta | z, s) count as decoder, as in
scvi-tools where they are part of ``DecoderTOTALVI``). Frozen BatchNorm layers are listed in
``module.eval_during_training``: training keeps them in eval mode, so they normalise with the
reference's running statistics and never update them (scvi-tools sets their momentum to 0
instead, which keeps the statistics but normalises training minibatches by their own).

**How the optimiser sees it.** :class:`~pyro_totalvi.train.Trainer` gives Adam only
parameters with ``requires_grad``; masked ones form a group with ``weight_decay=0``, and after
every backward pass their frozen entries' gradient is set to 0 while the trainable entries get
the L2 term ``weight_decay * p`` added by hand. A frozen entry then has gradient 0 at every
step, Adam's moments stay 0, and its update ``lr * m / (sqrt(v) + eps)`` is exactly 0: the
reference's values stay bit for bit (tested), whatever ``weight_decay`` is. Pyro sees none of
this: model and guide are unchanged, and ``pyro.module`` registers the same ``nn.Module`` whose
tensors were padded. With plain ``pyro.infer.SVI``, apply the masks between ``backward`` and
the optimiser step in the same way.

**Proteins of a query.** A query without the protein table (or with all-zero proteins in a
batch) is a batch with every protein unmeasured (the masks of :mod:`pyro_totalvi.data`): its
proteins add nothing to the likelihood and are zeroed in the encoder's input. Decoding such
cells as a reference batch (``transform_batch``) imputes them. A query measuring a subset of
the proteins has zeros in the others, masked per batch the same way.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import nn

from .checkpoint import read_saved_model
from .data import (
    REGISTRY_KEY,
    TotalVIDataError,
    _get_protein,
    anndata_from_mudata,
    batch_codes,
    is_mudata,
    register_anndata,
    registry_keys,
)
from .device import resolve_device
from .model import TotalVIModule
from .nn import FCLayers

__all__ = ["QueryMixin", "Reference", "load_reference", "query_registry", "covariate_labels",
           "covariate_readers", "transplant", "freeze", "MIN_VAR_NAME_RATIO"]

logger = logging.getLogger("pyro_totalvi")

#: Below this fraction of the reference's genes found in a query, prepare_query_anndata warns.
MIN_VAR_NAME_RATIO = 0.8

#: Submodules (by name prefix) with a role in the freeze flags. A module class may set its own
#: ``query_roles`` (same keys) for extra networks, e.g. ``{"classifier": ("classifier",)}``.
DEFAULT_ROLES = {
    "encoder": ("encoder",),  # q(z, l | x, y, s): freeze_expression, freeze_batchnorm_encoder
    "decoder_first_layer": ("decoder.rho.hidden",),  # scvi-tools' px_decoder
    "classifier": ("classifier",),  # freeze_classifier (label models)
}

_BATCH = "\0batch"  # label of the batch block in covariate_labels (no obs column has this name)


@dataclass
class Reference:
    """What mapping needs from a reference model (a ``TOTALVI`` or a saved one)."""

    registry: dict
    init_params: dict
    var_names: list[str]
    state: dict[str, torch.Tensor]
    is_trained: bool
    module_class: type | None
    where: str


def load_reference(reference_model) -> Reference:
    """The registry, settings, gene names and parameters (CPU copies) of ``reference_model``:
    a trained model or the directory of a saved one."""
    if isinstance(reference_model, (str, os.PathLike)):
        settings, state = read_saved_model(reference_model)
        return Reference(settings["registry"], dict(settings["init_params"]),
                         [str(v) for v in settings["var_names"]], state,
                         bool(settings["is_trained"]), None, f"saved model {reference_model}")
    module = getattr(reference_model, "module", None)
    if not isinstance(module, nn.Module) or not hasattr(reference_model, "registry"):
        raise TypeError("reference_model must be a TOTALVI model or the directory of a saved "
                        f"one, got {type(reference_model).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return Reference(copy.deepcopy(dict(reference_model.registry)),
                     dict(reference_model.init_params),
                     [str(v) for v in reference_model.adata.var_names], state,
                     bool(reference_model.is_trained), type(module), "the reference model")


# ----------------------------------------------------------------------------------------------
# preparing the query's features
def _padded(matrix, take: np.ndarray):
    """Columns ``take`` of ``matrix``, where index ``matrix.shape[1]`` means a column of zeros."""
    n = matrix.shape[0]
    if sp.issparse(matrix):
        zero = sp.csr_matrix((n, 1), dtype=matrix.dtype)
        return sp.hstack([sp.csr_matrix(matrix), zero], format="csc")[:, take].tocsr()
    matrix = np.asarray(matrix)
    return np.concatenate([matrix, np.zeros((n, 1), dtype=matrix.dtype)], axis=1)[:, take]


def pad_genes(adata: AnnData, var_names: pd.Index, what: str = "genes") -> AnnData:
    """``adata`` with the features ``var_names`` in that order: absent ones as zero counts,
    extra ones dropped (``X`` and every layer). Returns ``adata`` itself when nothing changes."""
    if not adata.var_names.is_unique:
        raise TotalVIDataError(f"the query has duplicated {what} names; make them unique first "
                               "(adata.var_names_make_unique())")
    present = var_names.isin(adata.var_names)
    if not present.any():
        raise TotalVIDataError(
            f"the query has none of the reference's {len(var_names)} {what} (reference: "
            f"{list(var_names[:5])}..., query: {list(adata.var_names[:5])}...); check that both "
            "use the same identifiers")
    if what == "genes" and present.mean() < MIN_VAR_NAME_RATIO:
        logger.warning("the query has only %.0f%% of the reference's genes; mapping may be poor",
                       100 * present.mean())
    if not present.all():
        logger.warning("%d of the reference's %d %s are absent from the query: added as zero "
                       "counts (e.g. %s)", int((~present).sum()), len(var_names), what,
                       list(var_names[~present][:5]))
    extra = int((~adata.var_names.isin(var_names)).sum())
    if extra:
        logger.info("%d query %s unknown to the reference are dropped", extra, what)
    if adata.var_names.equals(var_names):
        return adata
    if adata.isbacked:
        raise TotalVIDataError("prepare_query_anndata pads genes in memory: load the query "
                               "without backed='r' (or subset it to the reference's genes first)")
    pos = adata.var_names.get_indexer(var_names)
    take = np.where(pos >= 0, pos, adata.n_vars)
    return AnnData(X=_padded(adata.X, take), obs=adata.obs.copy(),
                   var=adata.var.reindex(var_names), uns=dict(adata.uns),
                   obsm=dict(adata.obsm), obsp=dict(adata.obsp),
                   layers={k: _padded(v, take) for k, v in adata.layers.items()})


def _align_table(table: pd.DataFrame, names: list[str], fill, what: str) -> pd.DataFrame:
    cols = [str(c) for c in table.columns]
    shared = [n for n in names if n in cols]
    if not shared:
        raise TotalVIDataError(
            f"{what} shares no protein names with the reference (reference: {names[:5]}..., "
            f"query: {cols[:5]}...); rename them, or delete the table for an RNA-only query")
    missing, extra = [n for n in names if n not in cols], [c for c in cols if c not in names]
    if missing:
        logger.warning("%s lacks %d of the reference's %d proteins: added as zeros, treated as "
                       "not measured (e.g. %s)", what, len(missing), len(names), missing[:5])
    if extra:
        logger.warning("%s: %d proteins unknown to the reference are dropped (e.g. %s)", what,
                       len(extra), extra[:5])
    return table.set_axis(cols, axis=1).reindex(columns=names, fill_value=fill)


def align_proteins(adata: AnnData, registry: dict) -> dict:
    """The ``obsm`` tables (protein counts, and a cells x proteins mask if the reference used
    one) reordered to the reference's proteins, absent ones filled as unmeasured; only those that
    change are returned."""
    names = [str(p) for p in registry["protein_names"]]
    key, mask_key = registry["protein_expression_obsm_key"], registry.get("protein_mask_obsm_key")
    out = {}
    if key not in adata.obsm:
        logger.info("the query has no adata.obsm[%r]: an RNA-only query, every protein is "
                    "treated as not measured", key)
        return out
    for k, fill in ((key, 0), (mask_key, False)):
        table = adata.obsm[k] if k is not None and k in adata.obsm else None
        if isinstance(table, pd.DataFrame) and [str(c) for c in table.columns] != names:
            out[k] = _align_table(table, names, fill, f"adata.obsm[{k!r}]")
    return out


# ----------------------------------------------------------------------------------------------
# the query model's registry
def _extend(old, new) -> list[str]:
    old = [str(c) for c in old]
    return old + [str(c) for c in new if str(c) not in old]


def _check_query_proteins(adata: AnnData, registry: dict) -> bool:
    """Whether the query has a protein table; raise if its proteins are not the reference's."""
    key, mask_key = registry["protein_expression_obsm_key"], registry.get("protein_mask_obsm_key")
    if key not in adata.obsm:
        return False
    names = [str(p) for p in registry["protein_names"]]
    got = _get_protein(adata, key)[1]
    if got != names:
        raise TotalVIDataError(
            f"the query's proteins (adata.obsm[{key!r}]) differ from the reference's: unknown "
            f"{[p for p in got if p not in names][:5]}, missing "
            f"{[p for p in names if p not in got][:5]}"
            + (", order differs" if sorted(got) == sorted(names) else "")
            + ". Call TOTALVI.prepare_query_anndata(adata, reference_model) first (it orders "
            "them and adds absent ones as unmeasured), or delete the table for an RNA-only query")
    if mask_key is not None and mask_key not in adata.obsm:
        raise TotalVIDataError(
            f"the reference was set up with protein_mask={mask_key!r}; the query has protein "
            f"counts but no adata.obsm[{mask_key!r}] (cells x proteins, True = measured)")
    return True


def query_registry(adata: AnnData, reference: dict) -> dict:
    """The registry of a query model, also written to ``adata.uns["_pyro_totalvi"]``.

    ``adata`` is validated with the reference's settings (keys, layer, covariates); the
    reference's batch and categorical covariate categories come first, the query's new ones are
    appended. A reference batches x proteins ``protein_mask`` gets rows for the new batches
    (measured where the query has counts). ``proteins_optional`` lets the query model take
    AnnData without proteins. Other registry entries (e.g. of an extension) are kept.
    """
    reg = copy.deepcopy(dict(reference))
    has_proteins = _check_query_proteins(adata, reg)
    cat_keys = registry_keys(reg, "categorical_covariate_keys")
    own = register_anndata(
        adata, reg["protein_expression_obsm_key"], reg["batch_key"], reg["layer"],
        protein_mask=reg.get("protein_mask_obsm_key") if has_proteins else None,
        categorical_covariate_keys=cat_keys,
        continuous_covariate_keys=registry_keys(reg, "continuous_covariate_keys"),
        proteins_optional=True)
    reg["batch_categories"] = _extend(reg["batch_categories"], own["batch_categories"])
    known = reg.get("categorical_covariate_categories") or {}
    reg["categorical_covariate_categories"] = {
        k: _extend(known[k], own["categorical_covariate_categories"][k]) for k in cat_keys}
    reg["protein_names"] = [str(p) for p in reg["protein_names"]]
    if reg.get("protein_mask") is not None:
        rows = [list(map(bool, r)) for r in reg["protein_mask"]]
        codes = batch_codes(adata, reg)
        y = _get_protein(adata, reg["protein_expression_obsm_key"])[0] if has_proteins else None
        for b in range(len(rows), len(reg["batch_categories"])):
            seen = np.zeros(len(reg["protein_names"]), bool) if y is None else (
                np.asarray(y[codes == b]).sum(axis=0) > 0)
            rows.append(seen.tolist())
        reg["protein_mask"] = rows
    reg["proteins_optional"] = True
    adata.uns[REGISTRY_KEY] = reg
    return reg


# ----------------------------------------------------------------------------------------------
# architecture surgery
def covariate_labels(registry: dict) -> list[tuple[str, str]]:
    """What each column of ``s ⊕ covariates`` (:meth:`TotalVIModule.network_input`) stands
    for: ``(key, category)`` of the one-hot batch and categorical covariates, ``(key, "")`` of a
    continuous covariate."""
    labels = [(_BATCH, str(c)) for c in registry["batch_categories"]]
    cats = registry.get("categorical_covariate_categories") or {}
    for key in registry_keys(registry, "categorical_covariate_keys"):
        labels += [(key, str(c)) for c in cats[key]]
    return labels + [(key, "") for key in registry_keys(registry, "continuous_covariate_keys")]


def covariate_readers(module: nn.Module) -> dict[str, int]:
    """Weights that read ``s ⊕ covariates``: parameter name -> index of the first covariate
    column. :class:`FCLayers` appends its covariates to every layer's input, so they are the
    last ``n_cov`` input columns of each of its ``Linear`` layers."""
    readers = {}
    for name, m in module.named_modules():
        if isinstance(m, FCLayers) and m.n_cov:
            for i, linear in enumerate(m.linears):
                readers[f"{name}.linears.{i}.weight"] = linear.in_features - m.n_cov
    return readers


def _pad_columns(old, fresh, start, source, n_old_labels, name):
    """Covariate columns of a weight moved to their new positions; new ones keep ``fresh``."""
    if old.shape[0] != fresh.shape[0] or old.shape[1] != start + n_old_labels:
        raise ValueError(f"cannot map {name}: reference shape {tuple(old.shape)}, expected "
                         f"({fresh.shape[0]}, {start} + {n_old_labels} covariate columns)")
    value, is_new = fresh.clone(), torch.zeros(fresh.shape, dtype=torch.bool)
    value[:, :start] = old[:, :start]
    kept = torch.as_tensor(source >= 0)
    cols = start + torch.arange(len(source))
    value[:, cols[kept]] = old[:, start + torch.as_tensor(source[source >= 0])]
    is_new[:, cols[~kept]] = True
    return value, is_new


def _pad_batches(old, fresh, n_old, n_new, name):
    """A per-batch tensor: the reference's batches keep their values (they come first)."""
    for a, b in zip(old.shape, fresh.shape):
        if old.dim() != fresh.dim() or (a != b and (a, b) != (n_old, n_new)):
            raise ValueError(
                f"cannot map {name} of the reference, shape {tuple(old.shape)}, onto "
                f"{tuple(fresh.shape)}: only covariate columns and batch dimensions "
                f"({n_old} -> {n_new}) can grow")
    value, is_new = fresh.clone(), torch.ones(fresh.shape, dtype=torch.bool)
    part = tuple(slice(0, n) for n in old.shape)
    value[part], is_new[part] = old, False
    return value, is_new


def transplant(reference: dict[str, torch.Tensor], module: nn.Module,
               old_labels: list, new_labels: list) -> dict[str, torch.Tensor]:
    """Load the reference's state into ``module`` (built for the extended categories).

    Tensors of equal shape are copied; the weights of :func:`covariate_readers` get their
    covariate columns moved to the new layout (``old_labels`` -> ``new_labels``); a tensor
    with a dimension of the number of batches gets the reference's batches first. Entries of
    new categories keep ``module``'s initialisation. Returns, per *parameter* with new entries,
    a bool mask of them.
    """
    n_old = sum(1 for k, _ in old_labels if k == _BATCH)
    n_new = sum(1 for k, _ in new_labels if k == _BATCH)
    where = {label: i for i, label in enumerate(old_labels)}
    source = np.array([where.get(label, -1) for label in new_labels])
    readers, params = covariate_readers(module), dict(module.named_parameters())
    state = module.state_dict()
    unknown = sorted(set(state) ^ set(reference))
    if unknown:
        raise ValueError(f"the reference's parameters do not match this module class: {unknown[:5]}"
                         " differ; map with the module_class the reference was trained with")
    new_entries = {}
    for name, fresh in state.items():
        old = reference[name].to(fresh.device, fresh.dtype)
        if old.shape == fresh.shape:
            state[name] = old
            continue
        if name in readers:
            value, is_new = _pad_columns(old, fresh, readers[name], source, len(old_labels), name)
        else:
            value, is_new = _pad_batches(old, fresh, n_old, n_new, name)
        state[name] = value
        if name in params:
            new_entries[name] = is_new
    module.load_state_dict(state)
    return new_entries


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze(module: nn.Module, new_entries: dict[str, torch.Tensor], unfrozen: bool = False,
           freeze_dropout: bool = False, freeze_expression: bool = True,
           freeze_decoder_first_layer: bool = True, freeze_batchnorm_encoder: bool = True,
           freeze_batchnorm_decoder: bool = False, freeze_classifier: bool = True) -> None:
    """Set what query training may change, with scvi-tools' flags (see the module docstring).

    Fully trainable: the first ``Linear`` of every encoder network (``freeze_expression=
    False``) and of the RNA decoder (``freeze_decoder_first_layer=False``), BatchNorm scale and
    shift of the encoder / the other networks (``freeze_batchnorm_encoder`` /
    ``freeze_batchnorm_decoder`` False), a classifier (``freeze_classifier=False``).
    Partly trainable (``module.grad_masks``): the ``new_entries``. Frozen BatchNorm layers go
    to ``module.eval_during_training``. ``freeze_dropout`` sets every dropout rate to 0.
    """
    roles = {**DEFAULT_ROLES, **getattr(module, "query_roles", {})}
    if freeze_dropout:
        for m in module.modules():
            if isinstance(m, FCLayers):
                m.dropout = 0.0
            elif isinstance(m, nn.Dropout):
                m.p = 0.0
    free, frozen_norms = [], []
    for name, m in module.named_modules():
        encoder, classifier = _under(name, roles["encoder"]), _under(name, roles["classifier"])
        if classifier and not freeze_classifier:
            free.append(name)
        elif isinstance(m, FCLayers) and (
                (encoder and not freeze_expression)
                or (_under(name, roles["decoder_first_layer"]) and not freeze_decoder_first_layer)):
            free.append(f"{name}.linears.0")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            frozen = (freeze_classifier if classifier else freeze_batchnorm_encoder if encoder
                      else freeze_batchnorm_decoder)
            (frozen_norms if frozen and not unfrozen else free).append(name)
    masks = {}
    for name, p in module.named_parameters():
        owner = name.rpartition(".")[0]
        if unfrozen or _under(owner, free):
            p.requires_grad_(True)
        elif name in new_entries:
            p.requires_grad_(True)
            masks[name] = new_entries[name]
        else:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(
            "nothing to train: the query brings no new batch or covariate categories and the "
            "freeze_* flags freeze every parameter; pass freeze_batchnorm_decoder=False (or "
            "another flag, or unfrozen=True), or use the reference model directly")
    module.grad_masks, module.eval_during_training = masks, tuple(frozen_norms)


# ----------------------------------------------------------------------------------------------
def _rna_view(adata, ref: Reference, subset_vars: bool) -> AnnData:
    """The query's AnnData (built from a MuData's modalities), its genes checked against the
    reference's (subset in place first with ``subset_vars``)."""
    var_names = pd.Index(ref.var_names)
    mudata = "mudata" in ref.registry
    if is_mudata(adata) != mudata:
        raise TotalVIDataError(f"{ref.where} was set up with "
                               f"{'a MuData' if mudata else 'an AnnData'}; pass the query as one")
    rna = adata.mod[ref.registry["mudata"]["modalities"]["rna_layer"]] if mudata else adata
    if subset_vars and not rna.var_names.equals(var_names):
        absent = var_names[~var_names.isin(rna.var_names)]
        if len(absent):
            raise TotalVIDataError(
                f"inplace_subset_query_vars=True needs every reference gene in the query; "
                f"{len(absent)} are absent (e.g. {list(absent[:5])}): call "
                "TOTALVI.prepare_query_anndata(adata, reference_model) to add them as zeros")
        rna._inplace_subset_var(var_names)
        if mudata:
            adata.update()
    if mudata:
        rna = anndata_from_mudata(adata, ref.registry)
    if not rna.var_names.equals(var_names):
        shared = int(var_names.isin(rna.var_names).sum())
        raise TotalVIDataError(
            f"the query's genes differ from the reference's ({rna.n_vars} genes, {shared} of "
            f"the reference's {len(var_names)} among them, "
            f"{'other order' if shared == len(var_names) == rna.n_vars else 'other set'}); "
            "call TOTALVI.prepare_query_anndata(adata, reference_model) first (it orders them "
            "and adds absent ones as zeros), or pass inplace_subset_query_vars=True")
    return rna


class QueryMixin:
    """scvi-tools' reference-mapping methods of :class:`~pyro_totalvi.TOTALVI` (see the
    module docstring for what is padded, what is frozen, and how the optimiser sees it)."""

    @staticmethod
    def prepare_query_anndata(adata: AnnData, reference_model,
                              return_reference_var_names: bool = False, inplace: bool = True):
        """Give a query the reference's genes, in the reference's order.

        Genes absent from the query are added as zero counts (a WARNING says how many), extra
        ones are dropped; a protein table is put in the reference's protein order, with absent
        proteins as zeros (not measured) and unknown ones dropped. ``reference_model``: a
        trained model or the directory of a saved one. Returns the reference's gene names with
        ``return_reference_var_names``, the prepared AnnData with ``inplace=False`` (``adata``
        itself if nothing changes), else ``None`` (``adata`` is changed in place).
        """
        ref = load_reference(reference_model)
        var_names = pd.Index(ref.var_names)
        if return_reference_var_names:
            return var_names
        out = pad_genes(adata, var_names)
        tables = align_proteins(out, ref.registry)
        if tables and out is adata and not inplace:
            out = adata.copy()
        for key, table in tables.items():
            out.obsm[key] = table
        if not inplace:
            return out
        if out is not adata:
            adata._init_as_actual(X=out.X, obs=out.obs, var=out.var, uns=out.uns, obsm=out.obsm,
                                  obsp=out.obsp, layers=out.layers)
        return None

    @staticmethod
    def prepare_query_mudata(mdata, reference_model, return_reference_var_names: bool = False,
                             inplace: bool = True):
        """:meth:`prepare_query_anndata` for a MuData: the RNA modality gets the reference's
        genes, the protein modality its proteins (absent ones as zeros, i.e. not measured).

        Returns ``{modality: names}`` with ``return_reference_var_names``, a new MuData with
        ``inplace=False``, else ``None``.
        """
        ref = load_reference(reference_model)
        if "mudata" not in ref.registry:
            raise TotalVIDataError(f"{ref.where} was set up with an AnnData; use "
                                   "prepare_query_anndata")
        mods = ref.registry["mudata"]["modalities"]
        names = {mods["rna_layer"]: pd.Index(ref.var_names),
                 mods["protein_layer"]: pd.Index(ref.registry["protein_names"])}
        if return_reference_var_names:
            return names
        if not inplace:
            mdata = mdata.copy()
        for (mod, var_names), what in zip(names.items(), ("genes", "proteins")):
            if mod not in mdata.mod:
                raise KeyError(f"modality {mod!r} not in the query (available: {list(mdata.mod)})")
            padded = pad_genes(mdata.mod[mod], var_names, what)
            if padded is not mdata.mod[mod]:
                mdata.mod[mod] = padded
        mdata.update()
        return None if inplace else mdata

    @classmethod
    def load_query_data(
        cls,
        adata,
        reference_model,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str | torch.device = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
        module_class: type[TotalVIModule] | None = None,
    ):
        """A model of the reference's weights plus new batch categories for the query ``adata``.

        ``adata`` (AnnData or MuData as the reference was set up; genes as the reference's, see
        :meth:`prepare_query_anndata`) may bring batch and covariate categories the reference
        has not seen; every weight that reads the one-hot batch gets new columns for them and
        every per-batch parameter new entries (module docstring). Train the result with
        ``train(max_epochs, plan_kwargs=dict(weight_decay=0.0))``: only what the flags leave
        free changes (scvi-tools' meaning). A query without ``obsm`` proteins (or all-zero
        ones) has every protein unmeasured; ``get_normalized_expression(transform_batch=<a
        reference batch>)`` then imputes them. Save and load the result like any model; it can
        be the reference of a further query.

        Parameters
        ----------
        reference_model
            A trained model or the directory of a saved one.
        inplace_subset_query_vars
            Subset ``adata``'s genes to the reference's in place (all must be present).
        accelerator, device
            Where the model goes, as in :meth:`train`.
        unfrozen
            Train everything (overrides the other flags).
        freeze_dropout
            Set every dropout rate to 0.
        freeze_expression
            ``False``: the first layer of the encoder trains entirely (gene and protein inputs).
        freeze_decoder_first_layer
            ``False``: the first layer of the RNA decoder trains entirely.
        freeze_batchnorm_encoder, freeze_batchnorm_decoder
            Keep BatchNorm scale, shift and running statistics of the encoder (q(z, l)) /
            of the other networks (decoders and q(beta)) as in the reference.
        freeze_classifier
            For a module with a classifier (``query_roles``): keep it as in the reference.
        module_class
            The module class; default: the reference's (for a saved reference, this class's
            default).
        """
        ref = load_reference(reference_model)
        if not ref.is_trained:
            raise ValueError(f"{ref.where} is not trained: train it (reference.train()) before "
                             "mapping a query onto it")
        rna = _rna_view(adata, ref, inplace_subset_query_vars)
        registry = query_registry(rna, ref.registry)
        if is_mudata(adata):
            adata.uns[REGISTRY_KEY] = registry
        module_class = module_class or ref.module_class or getattr(cls, "_module_cls",
                                                                   TotalVIModule)
        model = cls(adata, module_class=module_class, **ref.init_params)
        new_entries = transplant(ref.state, model.module, covariate_labels(ref.registry),
                                 covariate_labels(registry))
        freeze(model.module, new_entries, unfrozen, freeze_dropout, freeze_expression,
               freeze_decoder_first_layer, freeze_batchnorm_encoder, freeze_batchnorm_decoder,
               freeze_classifier)
        new = registry["batch_categories"][len(ref.registry["batch_categories"]):]
        logger.info("query mapped onto %s: new batch categories %s; %d trainable parameter "
                    "entries", ref.where, new, _n_trainable(model.module))
        model.module.to(resolve_device(accelerator, device))
        model.module.eval()
        model.is_trained = False
        return model


def _n_trainable(module: nn.Module) -> int:
    masks = getattr(module, "grad_masks", {})
    return sum(int(masks[n].sum()) if n in masks else p.numel()
               for n, p in module.named_parameters() if p.requires_grad)
