#!/usr/bin/env python
"""Drop-in check: scvi-tools' own TOTALVI tests, called on scvi-tools' TOTALVI and on ours.

Runs the call sequence of ``tests/model/test_totalvi.py`` of scvi-tools 1.4.2 (and the arguments
and return types that issue 16 lists) on ``scvi.data.synthetic_iid`` data, once with
``scvi.model.TOTALVI`` and once with ``pyro_totalvi.TOTALVI``, and prints per call the type and
shape of what each returned (or the exception it raised) and whether they agree. A difference is
accepted only if it is listed in :data:`DELIBERATE`, whose entries the README lists with their
reasons (section "Deliberate differences from scvi-tools"; ``tests/test_benchmarks.py`` checks
that the two lists agree). Exit status 1 if any other difference is found.

Run from the repository root with the benchmark venv (both packages import there):

    PYTHONPATH=$PWD benchmarks/.venv-scvi/bin/python benchmarks/compare_api.py

The data are generated once (seeded) and each side gets its own copies; saved models go to a
temporary directory outside the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import traceback
import warnings
from types import SimpleNamespace

import numpy as np

#: Calls whose results differ on purpose, keyed by call pattern (``model.name(...)`` matches
#: every call of ``name``; ``model.name(..., a=b)`` those passing ``a=b``); the README section
#: "Deliberate differences from scvi-tools" gives each reason at length.
DELIBERATE = {
    "model.train(...)": "returns the model, so that calls chain (scvi-tools returns None)",
    "model.history": "one DataFrame with a column per metric (scvi-tools: a dict of one-column "
                     "DataFrames); history['elbo_train'] is a Series",
    "model.get_elbo(...)": "a float, or a NumPy array per cell (scvi-tools: torch tensors)",
    "model.get_reconstruction_error(...)": "a dict of floats or NumPy arrays (scvi-tools: torch "
                                           "tensors)",
    "model.get_marginal_ll(..., return_mean=False)": "one value per cell (scvi-tools 1.4.2 "
                                                     "raises UnboundLocalError)",
    "model.get_likelihood_parameters(...)": "implemented (scvi-tools' TOTALVI raises "
                                            "NotImplementedError)",
    "model.differential_expression(...)": "one extra column, is_protein",
    "query proteins matched by name": "a query whose protein names differ is refused "
                                      "(scvi-tools matches proteins by position)",
    "model.adata_manager": "no AnnDataManager: the registry is a plain dict (model.registry, "
                           "adata.uns['_pyro_totalvi'])",
    "model.module": "a Pyro TotalVIModule, not scvi-tools' TOTALVAE, with other attributes",
    "legacy save format": "no pre-0.15 scvi-tools files to convert (no convert_legacy_save)",
    "TOTALVI(adata, gene_dispersion=..., protein_dispersion=...)": "only 'gene' and 'protein' "
                                                                   "(others: a subclass)",
    "TOTALVI(adata, extra_decoder_kwargs=...)": "no pre-1.2 exponential background activation",
    "TOTALVI(adata, use_batch_norm='decoder')": "BatchNorm in the encoder and the decoders only",
    "load_query_data / prepare_query_mudata": "reference mapping is issue 14's",
    "check_val_every_n_epoch=k with reduce_lr_on_plateau": "k is honoured (scvi-tools' TOTALVI "
                                                          "resets it to 1)",
}


def _tensor_like(theirs: str, ours: str) -> bool:
    """Ours is the NumPy/float version of scvi-tools' torch tensors."""
    ours = re.sub(r"\bnumber\b", "Tensor()", ours)
    return re.sub(r"ndarray(\([^)]*\))", r"Tensor\1", ours) == theirs


def _raises(*names):
    return lambda theirs, ours: ours in {f"raises {n}" for n in names}


def _history(theirs: str, ours: str) -> bool:
    metrics = ("elbo_train", "elbo_validation", "reconstruction_loss_train",
               "reconstruction_loss_validation", "kl_local_train", "kl_local_validation")
    return theirs.startswith("dict{") and ours.startswith("DataFrame") and all(
        f"{m}:" in theirs and f"'{m}'" in ours for m in metrics)


#: What ours must look like for the listed difference to be the deliberate one.
CHECKS = {
    "model.train(...)": lambda theirs, ours: (theirs, ours) == ("None", "TOTALVI"),
    "model.history": _history,
    "model.get_elbo(...)": _tensor_like,
    "model.get_reconstruction_error(...)": _tensor_like,
    "model.get_marginal_ll(..., return_mean=False)":
        lambda theirs, ours: theirs == "raises UnboundLocalError" and ours.startswith("ndarray"),
    "model.get_likelihood_parameters(...)":
        lambda theirs, ours: theirs == "raises NotImplementedError" and ours.startswith("dict{"),
    "model.differential_expression(...)":
        lambda theirs, ours: _without_is_protein(ours) == theirs,
    "query proteins matched by name": _raises("TotalVIDataError"),
    "model.adata_manager": _raises("AttributeError"),
    "model.module": lambda theirs, ours: True,
    "legacy save format": _raises("AttributeError"),
    "TOTALVI(adata, gene_dispersion=..., protein_dispersion=...)": _raises("ValueError"),
    "TOTALVI(adata, extra_decoder_kwargs=...)": _raises("TypeError"),
    "TOTALVI(adata, use_batch_norm='decoder')": _raises("ValueError"),
    "load_query_data / prepare_query_mudata": _raises("AttributeError"),
    "check_val_every_n_epoch=k with reduce_lr_on_plateau":
        lambda theirs, ours: (theirs, ours) == ("bool True", "bool False"),
}


# -- describing results -----------------------------------------------------------------------
def describe(value) -> str:
    """Type and shape of a result, as a comparable string."""
    import pandas as pd
    import torch

    if isinstance(value, BaseException):
        return f"raises {type(value).__name__}"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return f"bool {value}"
    if isinstance(value, (int, float, np.floating, np.integer)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"ndarray{value.shape}"
    if isinstance(value, pd.DataFrame):
        return f"DataFrame{value.shape} columns={sorted(map(str, value.columns))}"
    if isinstance(value, pd.Series):
        return f"Series{value.shape}"
    if isinstance(value, dict):
        return "dict{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


class Recorder:
    """Runs the calls of one side and records ``(test, call, description)``."""

    def __init__(self, side: str):
        self.side, self.rows, self.test = side, [], ""

    def __call__(self, call: str, fn, expect: type[BaseException] | None = None):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                value = fn()
            desc = describe(value) if expect is None else f"did not raise {expect.__name__}"
        except Exception as err:  # recorded, not fatal: later calls still run
            value = err
            desc = (f"raises {expect.__name__}, as the test expects"
                    if expect is not None and isinstance(err, expect) else describe(err))
            if os.environ.get("COMPARE_API_DEBUG"):
                traceback.print_exc()
        self.rows.append((self.test, call, desc))
        return None if isinstance(value, BaseException) else value


# -- the data ---------------------------------------------------------------------------------
def make_data():
    """Seeded synthetic_iid data sets, generated once; each side copies them."""
    from scvi.data import synthetic_iid

    np.random.seed(0)
    return {"default": synthetic_iid(), "200 genes": synthetic_iid(n_genes=200),
            "50 proteins": synthetic_iid(n_genes=50),
            "mudata": synthetic_iid(return_mudata=True)}


def environment(side: str, data, tmp: str) -> SimpleNamespace:
    from mudata import MuData

    if side == "scvi-tools":
        from scvi.model import TOTALVI
    else:
        from pyro_totalvi import TOTALVI

    def synthetic_iid(n_genes=100, return_mudata=False):
        if return_mudata:
            return data["mudata"].copy()
        return data["200 genes" if n_genes == 200 else "default"].copy()

    def synthetic_proteins():  # synthetic_iid(n_genes=50), the tests' protein modality
        return data["50 proteins"].copy()

    return SimpleNamespace(TOTALVI=TOTALVI, synthetic_iid=synthetic_iid, MuData=MuData,
                           proteins=synthetic_proteins, save=os.path.join(tmp, side), side=side)


# -- scvi-tools' tests/model/test_totalvi.py (1.4.2), call by call ------------------------------
SETUP = dict(batch_key="batch", protein_expression_obsm_key="protein_expression",
             protein_names_uns_key="protein_names")


def t_saving_and_loading(run, e):
    T, adata, path, prefix = e.TOTALVI, e.synthetic_iid(), e.save, "TOTALVI_"
    run("TOTALVI.setup_anndata(adata, batch_key=..., protein_names_uns_key='protein_names')",
        lambda: T.setup_anndata(adata, **SETUP))
    model = run("TOTALVI(adata, latent_distribution='normal')",
                lambda: T(adata, latent_distribution="normal"))
    run("model.train(1, train_size=0.2)", lambda: model.train(1, train_size=0.2))
    z1 = run("model.get_latent_representation(adata)", lambda: model.get_latent_representation(adata))
    idx1 = run("model.validation_indices", lambda: model.validation_indices)
    run("model.save(path, overwrite=True, save_anndata=True, prefix=prefix)",
        lambda: model.save(path, overwrite=True, save_anndata=True, prefix=prefix))
    run("TOTALVI.view_setup_args(path, prefix=prefix)", lambda: T.view_setup_args(path, prefix=prefix))
    loaded = run("TOTALVI.load(path, prefix=prefix)", lambda: T.load(path, prefix=prefix))
    run("loaded.get_latent_representation()", lambda: loaded.get_latent_representation())
    run("TOTALVI.load(path, adata=<200 genes>, prefix=prefix)",
        lambda: T.load(path, adata=e.synthetic_iid(n_genes=200), prefix=prefix), ValueError)
    other = e.synthetic_iid()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories(["batch_2", "batch_3"])
    run("TOTALVI.load(path, adata=<other batches>, prefix=prefix)",
        lambda: T.load(path, adata=other, prefix=prefix), ValueError)
    model = run("TOTALVI.load(path, adata=adata, prefix=prefix)",
                lambda: T.load(path, adata=adata, prefix=prefix))
    run("model.adata_manager", lambda: model.adata_manager.data_registry.batch)
    z2 = run("model.get_latent_representation()", lambda: model.get_latent_representation())
    run("z1 == z2 after load", lambda: bool(np.array_equal(z1, z2)))
    run("validation_indices kept by save/load",
        lambda: bool(np.array_equal(idx1, model.validation_indices)))
    run("model.is_trained", lambda: model.is_trained)
    run("legacy save format", lambda: T.convert_legacy_save)


def t_totalvi_first_model(run, e):
    T, adata = e.TOTALVI, e.synthetic_iid()
    run("TOTALVI.setup_anndata(adata, ...)", lambda: T.setup_anndata(adata, **SETUP))
    model = run("TOTALVI(adata, n_latent=10)", lambda: T(adata, n_latent=10))
    run("model.train(1, train_size=0.5)", lambda: model.train(1, train_size=0.5))
    calls = {
        "model.is_trained": lambda: model.is_trained,
        "model.get_latent_representation()": lambda: model.get_latent_representation(),
        "model.get_elbo()": lambda: model.get_elbo(),
        "model.get_marginal_ll(n_mc_samples=3)": lambda: model.get_marginal_ll(n_mc_samples=3),
        "model.get_reconstruction_error()": lambda: model.get_reconstruction_error(),
        "model.get_normalized_expression()": lambda: model.get_normalized_expression(),
        "model.get_normalized_expression(transform_batch=['batch_0', 'batch_1'])":
            lambda: model.get_normalized_expression(transform_batch=["batch_0", "batch_1"]),
        "model.get_latent_library_size()": lambda: model.get_latent_library_size(),
        "model.get_protein_foreground_probability()":
            lambda: model.get_protein_foreground_probability(),
        "model.get_protein_foreground_probability(transform_batch=[...])":
            lambda: model.get_protein_foreground_probability(transform_batch=["batch_0",
                                                                              "batch_1"]),
        "model.posterior_predictive_sample(n_samples=2)":
            lambda: model.posterior_predictive_sample(n_samples=2),
        "model.posterior_predictive_sample(n_samples=1)":
            lambda: model.posterior_predictive_sample(n_samples=1),
        "model.get_feature_correlation_matrix(correlation_type='spearman')":
            lambda: model.get_feature_correlation_matrix(correlation_type="spearman"),
        "model.get_feature_correlation_matrix(spearman, transform_batch=[...])":
            lambda: model.get_feature_correlation_matrix(
                correlation_type="spearman", transform_batch=["batch_0", "batch_1"]),
        "model.get_feature_correlation_matrix(correlation_type='pearson')":
            lambda: model.get_feature_correlation_matrix(correlation_type="pearson"),
        "model.get_elbo(indices=model.validation_indices)":
            lambda: model.get_elbo(indices=model.validation_indices),
        "model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=3)":
            lambda: model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=3),
        "model.get_reconstruction_error(indices=model.validation_indices)":
            lambda: model.get_reconstruction_error(indices=model.validation_indices),
    }
    for call, fn in calls.items():
        run(call, fn)
    return model


def t_totalvi_query_data(run, e, model):
    T, adata2 = e.TOTALVI, e.synthetic_iid()
    run("TOTALVI.setup_anndata(adata2, ...)", lambda: T.setup_anndata(adata2, **SETUP))
    run("model.get_normalized_expression(adata2, indices=[1, 2, 3])",
        lambda: model.get_normalized_expression(adata2, indices=[1, 2, 3]))
    run("model.get_normalized_expression(adata2, gene_list=..., protein_list=..., "
        "transform_batch=[...])",
        lambda: model.get_normalized_expression(
            adata2, gene_list=adata2.var_names[:5].to_list(),
            protein_list=adata2.uns["protein_names"][:3], transform_batch=["batch_0", "batch_1"]))
    run("model.get_latent_library_size(adata2, indices=[1, 2, 3])",
        lambda: model.get_latent_library_size(adata2, indices=[1, 2, 3]))
    run("model.get_protein_foreground_probability(adata2, indices=[1, 2, 3], protein_list=[...])",
        lambda: model.get_protein_foreground_probability(
            adata2, indices=[1, 2, 3], protein_list=["protein_1", "protein_2"]))
    run("model.posterior_predictive_sample(adata2)", lambda: model.posterior_predictive_sample(adata2))
    run("model.get_feature_correlation_matrix(adata2)",
        lambda: model.get_feature_correlation_matrix(adata2))
    run("model.get_elbo(synthetic_iid()[:10])", lambda: model.get_elbo(e.synthetic_iid()[:10]))


def t_totalvi_transfer_and_de(run, e):
    T, adata = e.TOTALVI, e.synthetic_iid()
    run("TOTALVI.setup_anndata(adata) without protein names",
        lambda: T.setup_anndata(adata, batch_key="batch",
                                protein_expression_obsm_key="protein_expression"))
    model = run("TOTALVI(adata)", lambda: T(adata))
    run("model.train(1, train_size=0.5)", lambda: model.train(1, train_size=0.5))
    run("model.get_elbo(<unregistered adata2>)", lambda: model.get_elbo(e.synthetic_iid()))
    bad = e.synthetic_iid()
    bad.obs.batch = bad.obs.batch.cat.rename_categories(["batch_0", "batch_10"])
    run("model.get_elbo(<adata2 with an unseen batch>)", lambda: model.get_elbo(bad), ValueError)
    swapped = e.synthetic_iid()
    swapped.obs.batch = swapped.obs.batch.cat.rename_categories(["batch_1", "batch_0"])
    run("model.get_elbo(<adata2, batches in another order>)", lambda: model.get_elbo(swapped))
    missing = e.synthetic_iid()
    del missing.obsm["protein_expression"]
    run("model.get_elbo(<adata2 without proteins>)", lambda: model.get_elbo(missing), KeyError)
    for call, kw in (
            ("groupby='labels', group1='label_1', pseudocounts=7e-5",
             dict(groupby="labels", group1="label_1", pseudocounts=7e-5)),
            ("groupby='labels', group1='label_1', group2='label_2'",
             dict(groupby="labels", group1="label_1", group2="label_2")),
            ("idx1=[0, 1, 2], idx2=[3, 4, 5]", dict(idx1=[0, 1, 2], idx2=[3, 4, 5])),
            ("idx1=[0, 1, 2]", dict(idx1=[0, 1, 2])),
            ("groupby='labels'", dict(groupby="labels")),
            ("groupby='labels', group1='label_1', mode='vanilla'",
             dict(groupby="labels", group1="label_1", mode="vanilla")),
            ("groupby='labels', group1='label_1', batch_correction=True, batchid1=['batch_0'], "
             "batchid2=['batch_1']",
             dict(groupby="labels", group1="label_1", batch_correction=True,
                  batchid1=["batch_0"], batchid2=["batch_1"])),
            ("groupby='labels', group1='label_1', scale_protein=True, sample_protein_mixing="
             "True, include_protein_background=True, batch_size=64, silent=True, "
             "n_samples_overall=500, use_field=['protein']",
             dict(groupby="labels", group1="label_1", scale_protein=True,
                  sample_protein_mixing=True, include_protein_background=True, batch_size=64,
                  n_samples_overall=500, use_field=["protein"]))):
        run(f"model.differential_expression({call})",
            lambda kw=kw: model.differential_expression(**kw, silent=True))
    return model


def t_api_parity(run, e, model):
    """Issue 16's list: the arguments and return types beyond scvi-tools' own tests."""
    calls = {
        "model.history": lambda: model.history,
        "model.train_indices": lambda: model.train_indices,
        "model.test_indices": lambda: model.test_indices,
        "model.summary_string": lambda: model.summary_string,
        "repr(model)": lambda: repr(model),
        "model.view_anndata_setup()": lambda: model.view_anndata_setup(),
        "model.get_elbo(return_mean=False)": lambda: model.get_elbo(return_mean=False),
        "model.get_reconstruction_error(return_mean=False)":
            lambda: model.get_reconstruction_error(return_mean=False),
        "model.get_marginal_ll(n_mc_samples=3, return_mean=False)":
            lambda: model.get_marginal_ll(n_mc_samples=3, return_mean=False),
        "model.get_latent_representation(give_mean=False, mc_samples=10)":
            lambda: model.get_latent_representation(give_mean=False, mc_samples=10),
        "model.get_latent_representation(return_dist=True)":
            lambda: model.get_latent_representation(return_dist=True),
        "model.get_likelihood_parameters()": lambda: model.get_likelihood_parameters(),
        "model.get_normalized_expression(n_samples_overall=50, silent=False)":
            lambda: model.get_normalized_expression(n_samples_overall=50, silent=False),
        "model.get_normalized_expression(n_samples=3, return_mean=False)":
            lambda: model.get_normalized_expression(n_samples=3, return_mean=False),
        "model.get_normalized_expression(n_samples=3, return_numpy=True)":
            lambda: model.get_normalized_expression(n_samples=3, return_numpy=True),
        "model.get_protein_foreground_probability(n_samples=3, return_mean=False)":
            lambda: model.get_protein_foreground_probability(n_samples=3, return_mean=False),
    }
    for call, fn in calls.items():
        run(call, fn)


def t_train_arguments(run, e):
    T, adata = e.TOTALVI, e.synthetic_iid()
    T.setup_anndata(adata, **SETUP)
    model = run("TOTALVI(adata, n_latent=5)", lambda: T(adata, n_latent=5))
    run("model.train(2, train_size=0.5, validation_size=0.3, shuffle_set_split=False, "
        "n_epochs_kl_warmup=2, plan_kwargs={lr, weight_decay, eps}, datasplitter_kwargs={}, "
        "devices=1, accelerator='cpu', batch_size=128, early_stopping_patience=5)",
        lambda: model.train(2, train_size=0.5, validation_size=0.3, shuffle_set_split=False,
                            n_epochs_kl_warmup=2, plan_kwargs={"lr": 1e-3, "weight_decay": 1e-5,
                                                               "eps": 0.01},
                            datasplitter_kwargs={}, devices=1, accelerator="cpu", batch_size=128,
                            early_stopping_patience=5))
    run("(train, validation, test) sizes", lambda: tuple(
        len(getattr(model, f"{k}_indices")) for k in ("train", "validation", "test")))
    run("validation cells come first without shuffling",
        lambda: bool(np.array_equal(np.sort(model.validation_indices), np.arange(120))))
    run("model.train(1, n_steps_kl_warmup=10, early_stopping=False, reduce_lr_on_plateau=False, "
        "check_val_every_n_epoch=1)",
        lambda: model.train(1, n_steps_kl_warmup=10, early_stopping=False,
                            reduce_lr_on_plateau=False, check_val_every_n_epoch=1))
    run("model.train(1, no_such_argument=1)", lambda: model.train(1, no_such_argument=1),
        TypeError)


def t_library_size_and_size_factor(run, e):
    T, adata = e.TOTALVI, e.synthetic_iid()
    T.setup_anndata(adata, **SETUP)
    model = run("TOTALVI(adata, n_latent=10, use_observed_lib_size=False)",
                lambda: T(adata, n_latent=10, use_observed_lib_size=False))
    run("hasattr(model.module, 'library_log_means')",
        lambda: hasattr(model.module, "library_log_means"))
    run("model.train(1, train_size=0.5)", lambda: model.train(1, train_size=0.5))
    for call, fn in (("model.get_elbo()", lambda: model.get_elbo()),
                     ("model.get_marginal_ll(n_mc_samples=3)",
                      lambda: model.get_marginal_ll(n_mc_samples=3)),
                     ("model.get_latent_library_size()", lambda: model.get_latent_library_size())):
        run(call, fn)
    sf = e.synthetic_iid()
    sf.obs["size_factor"] = np.random.default_rng(1).integers(1, 5, size=sf.n_obs)
    run("TOTALVI.setup_anndata(adata, ..., size_factor_key='size_factor')",
        lambda: T.setup_anndata(sf, **SETUP, size_factor_key="size_factor"))
    for observed in (False, True):
        m = run(f"TOTALVI(adata, n_latent=10, use_observed_lib_size={observed}) with size factor",
                lambda observed=observed: T(sf, n_latent=10, use_observed_lib_size=observed))
        run("model.module: no library_log_means with a size factor",
            lambda m=m: not hasattr(m.module, "library_log_means"))
        run("model.module.use_size_factor_key", lambda m=m: m.module.use_size_factor_key)
        run("model.train(1, train_size=0.5) with size factor", lambda m=m: m.train(1, train_size=0.5))
    run("size-factor model: get_normalized_expression(library_size='latent')",
        lambda: m.get_normalized_expression(library_size="latent"))


def t_covariates(run, e):
    T = e.TOTALVI
    for encode in (None, True):
        adata = e.synthetic_iid()
        rng = np.random.default_rng(2)
        adata.obs["cont1"], adata.obs["cont2"] = rng.normal(size=(2, adata.n_obs))
        adata.obs["cat1"], adata.obs["cat2"] = rng.integers(0, 5, size=(2, adata.n_obs))
        run("TOTALVI.setup_anndata(adata, ..., continuous_covariate_keys=..., "
            "categorical_covariate_keys=...)",
            lambda adata=adata: T.setup_anndata(adata, **SETUP,
                                                continuous_covariate_keys=["cont1", "cont2"],
                                                categorical_covariate_keys=["cat1", "cat2"]))
        kw = {} if encode is None else {"encode_covariates": True}
        m = run(f"TOTALVI(adata{', encode_covariates=True' if encode else ''})",
                lambda adata=adata, kw=kw: T(adata, **kw))
        run("m.train(1)", lambda m=m: m.train(1))
        if encode:
            continue
        for call in ("get_latent_representation()", "get_elbo()",
                     "get_marginal_ll(n_mc_samples=3)", "get_reconstruction_error()",
                     "get_normalized_expression(n_samples=1)",
                     "get_normalized_expression(n_samples=2)"):
            run(f"m.{call}", lambda m=m, call=call: eval(f"m.{call}"))  # noqa: S307


MODS = {"rna_layer": "rna", "batch_key": "rna", "protein_layer": "protein"}


def _mudata(e, proteins_named=True):
    adata, protein = e.synthetic_iid(), (e.synthetic_iid() if proteins_named else e.proteins())
    if proteins_named:
        protein.var_names = protein.uns["protein_names"]
    return e.MuData({"rna": adata, "protein": protein})


def t_mudata(run, e):
    T, mdata = e.TOTALVI, _mudata(e)
    run("TOTALVI.setup_mudata(mdata, batch_key='batch', modalities=...)",
        lambda: T.setup_mudata(mdata, batch_key="batch", modalities=MODS))
    model = run("TOTALVI(mdata, n_latent=10)", lambda: T(mdata, n_latent=10))
    run("model.train(1, train_size=0.5)", lambda: model.train(1, train_size=0.5))
    for call in ("get_latent_representation()", "get_elbo()", "get_marginal_ll(n_mc_samples=3)",
                 "get_reconstruction_error()", "get_normalized_expression()",
                 "get_normalized_expression(transform_batch=['batch_0', 'batch_1'])",
                 "get_latent_library_size()", "get_protein_foreground_probability()",
                 "posterior_predictive_sample(n_samples=2)",
                 "get_feature_correlation_matrix(correlation_type='pearson')",
                 "get_elbo(indices=model.validation_indices)"):
        run(f"model.{call} (MuData)",
            lambda call=call, model=model: eval(f"model.{call}"))  # noqa: S307
    mdata2 = _mudata(e)
    run("TOTALVI.setup_mudata(mdata2, ...)",
        lambda: T.setup_mudata(mdata2, batch_key="batch", modalities=MODS))
    run("model.get_normalized_expression(mdata2, indices=[1, 2, 3])",
        lambda: model.get_normalized_expression(mdata2, indices=[1, 2, 3]))
    run("model.get_protein_foreground_probability(mdata2, indices=[1, 2, 3], protein_list=...)",
        lambda: model.get_protein_foreground_probability(mdata2, indices=[1, 2, 3],
                                                         protein_list=["protein_1", "protein_2"]))
    run("model.posterior_predictive_sample(mdata2)", lambda: model.posterior_predictive_sample(mdata2))
    unnamed = e.MuData({"rna": e.synthetic_iid(), "protein": e.synthetic_iid()})
    run("query proteins matched by name: model.get_elbo(<MuData, proteins named gene_*>[:10])",
        lambda: model.get_elbo(unnamed[:10]))


def t_mudata_transfer_and_save(run, e, tmp):
    T, mdata = e.TOTALVI, _mudata(e, proteins_named=False)
    T.setup_mudata(mdata, batch_key="batch", modalities=MODS)
    model = run("TOTALVI(mdata) (50 proteins)", lambda: T(mdata))
    run("model.get_elbo(<unregistered mdata2>)", lambda: model.get_elbo(_mudata(e, False)))
    bad = _mudata(e, False)
    bad["rna"].obs.batch = bad["rna"].obs.batch.cat.rename_categories(["batch_0", "batch_10"])
    run("model.get_elbo(<mdata2 with an unseen batch>)", lambda: model.get_elbo(bad), ValueError)
    run("model.train(1, train_size=0.2)", lambda: model.train(1, train_size=0.2))
    z1, idx1 = model.get_latent_representation(mdata), model.validation_indices
    path = os.path.join(tmp, "mudata_model")
    run("model.save(path, overwrite=True, save_anndata=True) (MuData)",
        lambda: model.save(path, overwrite=True, save_anndata=True))
    loaded = run("TOTALVI.load(path) (MuData saved with the model)", lambda: T.load(path))
    run("loaded.get_latent_representation()", lambda: loaded.get_latent_representation())
    other = e.MuData({"rna": e.synthetic_iid(n_genes=200), "protein": e.proteins()})
    run("TOTALVI.load(path, adata=<mdata, 200 genes>)", lambda: T.load(path, adata=other),
        ValueError)
    again = run("TOTALVI.load(path, adata=mdata)", lambda: T.load(path, adata=mdata))
    run("z1 == z2 and validation indices kept (MuData)", lambda: bool(
        np.array_equal(z1, again.get_latent_representation())
        and np.array_equal(idx1, again.validation_indices)))
    run("model.save(path, overwrite=True, save_anndata=False, legacy_mudata_format=True)",
        lambda: model.save(path, overwrite=True, save_anndata=False, legacy_mudata_format=True))


def t_other_options(run, e, tmp):
    T = e.TOTALVI
    adata = e.synthetic_iid()
    adata.obsm["protein_expression"][adata.obs.batch == "batch_1", :10] = 0
    T.setup_anndata(adata, **SETUP)
    for kw in ({}, {"override_missing_proteins": True}):
        m = run(f"TOTALVI(adata{', override_missing_proteins=True' if kw else ''}) "
                "(10 proteins missing in batch_1)", lambda kw=kw: T(adata, **kw))
        run("model.train(1, train_size=0.5) with missing proteins",
            lambda m=m: m.train(1, train_size=0.5))
    panel = e.synthetic_iid()
    panel.obs["panel"] = np.where(np.arange(panel.n_obs) % 3 == 0, "p1", "p0")
    run("TOTALVI.setup_anndata(adata, ..., panel_key='panel')",
        lambda: T.setup_anndata(panel, **SETUP, panel_key="panel"))
    m = run("TOTALVI(adata) with panels", lambda: T(panel))
    run("model.train(1) with panels", lambda: m.train(1))
    run("TOTALVI(adata, gene_dispersion=..., protein_dispersion=...)",
        lambda: T(adata, gene_dispersion="gene-batch", protein_dispersion="protein-batch"))
    run("TOTALVI(adata, extra_decoder_kwargs=...)",
        lambda: T(adata, extra_decoder_kwargs={"activation_function_bg": "exp"}))
    run("TOTALVI(adata, use_batch_norm='decoder')", lambda: T(adata, use_batch_norm="decoder"))
    run("load_query_data / prepare_query_mudata",
        lambda: (T.load_query_data, T.prepare_query_mudata))
    fresh = T(panel)
    run("check_val_every_n_epoch=k with reduce_lr_on_plateau: validated every epoch?",
        lambda: (fresh.train(2, check_val_every_n_epoch=2), _validated_every_epoch(fresh))[1])


def _validated_every_epoch(model) -> bool:
    h = model.history
    if isinstance(h, dict):  # scvi-tools: one DataFrame per metric, rows where it was logged
        return len(h["elbo_validation"]) == len(h["train_loss"])
    return bool(h["elbo_validation"].notna().all())


TESTS = ("t_saving_and_loading", "t_totalvi_first_model", "t_totalvi_query_data",
         "t_totalvi_transfer_and_de", "t_api_parity", "t_train_arguments",
         "t_library_size_and_size_factor", "t_covariates", "t_mudata",
         "t_mudata_transfer_and_save", "t_other_options")


def run_side(side: str, data, tmp: str) -> list[tuple[str, str, str]]:
    import torch

    torch.manual_seed(0)
    e = environment(side, data, tmp)
    run = Recorder(side)
    model = None
    for name in TESTS:
        run.test = name
        fn = globals()[name]
        if name in ("t_totalvi_query_data", "t_api_parity"):
            fn(run, e, model)
        elif name in ("t_mudata_transfer_and_save", "t_other_options"):
            fn(run, e, tmp)
        else:
            result = fn(run, e)
            model = result if result is not None else model
    return run.rows


def _without_is_protein(desc: str) -> str:
    """A DataFrame description with the ``is_protein`` column taken out."""
    def fix(m):
        return f"DataFrame({m.group(1)}, {int(m.group(2)) - 1}) columns=" + m.group(3)
    if "'is_protein'" not in desc:
        return desc
    desc = re.sub(r", 'is_protein'|'is_protein', ", "", desc)
    return re.sub(r"DataFrame\((\d+), (\d+)\) columns=(\[)", fix, desc)


def _key_matches(key: str, call: str) -> bool:
    pattern = re.fullmatch(r"model\.(\w+)\((.*)\)", key)
    if pattern is None:
        return call.startswith(key)
    found = re.match(r"\w+\.(\w+)\((.*)\)", call)
    required = [a.strip() for a in pattern.group(2).split(",") if a.strip() not in ("", "...")]
    return (found is not None and found.group(1) == pattern.group(1)
            and all(r in found.group(2) for r in required))


def deliberate(call: str, theirs: str, ours: str) -> str | None:
    """The README's reason when this call's difference is a listed deliberate one (and ours
    looks as that entry says)."""
    if call.startswith(("model.module", "hasattr(model.module")):
        return DELIBERATE["model.module"]
    keys = sorted((k for k in DELIBERATE if _key_matches(k, call)), key=len, reverse=True)
    for key in keys:  # most specific first
        if CHECKS[key](theirs, ours):
            return DELIBERATE[key]
    return None


def compare(theirs, ours) -> tuple[list[tuple], int]:
    rows, n_bad = [], 0
    for (test, call, a), (_, call_b, b) in zip(theirs, ours, strict=True):
        assert call == call_b, (call, call_b)
        reason = None if a == b else deliberate(call, a, b)
        if a == b and a.startswith("raises ") and not a.endswith("as the test expects"):
            verdict, n_bad = "both raise", n_bad + 1  # an unexpected error on both sides
        elif a == b:
            verdict = "same"
        elif reason is not None:
            verdict = f"deliberate: {reason}"
        else:
            verdict, n_bad = "DIFFERENT", n_bad + 1
        rows.append((test, call, a, b, verdict))
    return rows, n_bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=100, help="characters per description")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import rich.pretty  # noqa: F401  scvi-tools' view_* calls need it; it is not imported there
    import scvi
    import torch

    import pyro_totalvi

    torch.set_num_threads(1)
    scvi.settings.verbosity = 40
    data = make_data()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {side: run_side(side, data, tmp) for side in ("scvi-tools", "pyro_totalvi")}
    rows, n_bad = compare(sides["scvi-tools"], sides["pyro_totalvi"])
    print(f"scvi-tools {scvi.__version__} vs pyro_totalvi {pyro_totalvi.__version__} "
          f"({pyro_totalvi.__file__}); {len(rows)} calls")
    test = None
    for t, call, a, b, verdict in rows:
        if t != test:
            print(f"\n== {t}")
            test = t
        mark = "ok " if verdict == "same" else ("~  " if verdict.startswith("deliberate")
                                                 else "!! ")
        print(f"{mark}{call}")
        if verdict != "same":
            print(f"     scvi-tools  : {a[:args.width]}\n     pyro_totalvi: {b[:args.width]}"
                  f"\n     {verdict}")
    n_same = sum(r[4] == "same" for r in rows)
    print(f"\n{n_same} calls agree, {len(rows) - n_same - n_bad} differ as listed in README "
          f"(deliberate), {n_bad} differ otherwise")
    return 1 if n_bad else 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    sys.exit(main())
