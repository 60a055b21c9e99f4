"""scvi-tools' TOTALVI arguments and return types (issue 16), without scvi-tools.

Each test checks what an argument *does* (sizes of the split, the warm-up schedule, the model's
mean under a size factor, which background prior a panel selects, ...), not only that it is
accepted. ``benchmarks/compare_api.py`` compares the same calls against scvi-tools itself.
"""

import re

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine

from pyro_totalvi import TOTALVI, TotalVIDataError, simulate
from pyro_totalvi.de import _lfc_table
from pyro_totalvi.train import TrainingPlan

from .conftest import ROOT, benchmark_module

SMALL = dict(n_latent=4, n_hidden=16)
QUIET = dict(progress_bar=False)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def small():
    """200 cells x 30 genes x 8 proteins, 2 batches, 3 groups (copy before registering)."""
    return simulate(200, n_genes=30, n_proteins=8, n_batches=2, n_groups=3, seed=3)


def _setup(a, **kw):
    TOTALVI.setup_anndata(a, batch_key="batch", **kw)
    return a


# -- setup_anndata ---------------------------------------------------------------------------
def test_protein_names_come_from_uns_or_are_numbered(small):
    a = small.copy()
    a.obsm["protein_expression"] = a.obsm["protein_expression"].to_numpy()
    _setup(a)
    assert a.uns["_pyro_totalvi"]["protein_names"] == [str(i) for i in range(8)]  # as scvi
    a.uns["names"] = np.array([f"CD{i}" for i in range(8)])
    _setup(a, protein_names_uns_key="names")
    m = TOTALVI(a, **SMALL)
    assert list(m.get_protein_foreground_probability(indices=[0]).columns) == list(a.uns["names"])
    a.uns["short"] = ["CD1", "CD2"]
    with pytest.raises(TotalVIDataError, match="one distinct name per column"):
        _setup(a, protein_names_uns_key="short")
    with pytest.raises(KeyError, match="nope"):
        _setup(a, protein_names_uns_key="nope")


def test_size_factor_scales_a_softplus_rho(small):
    a = small.copy()
    a.obs["sf"] = np.random.default_rng(0).uniform(0.5, 4.0, a.n_obs)
    _setup(a, size_factor_key="sf")
    m = TOTALVI(a, use_observed_lib_size=False, **SMALL)  # the size factor takes priority
    assert m.module.use_size_factor_key and m.module.use_observed_lib_size
    mb = m.data.minibatch(np.arange(20))
    torch.testing.assert_close(mb.log_library.exp().squeeze(-1),
                               torch.tensor(a.obs["sf"].to_numpy()[:20], dtype=torch.float32))
    m.module.eval()
    guide = poutine.trace(m.module.guide).get_trace(*mb.args())
    tr = poutine.trace(poutine.replay(m.module.model, trace=guide)).get_trace(*mb.args())
    rho = tr.nodes["rho"]["value"]
    assert "l" not in tr.nodes and (rho >= 0).all()
    assert not torch.allclose(rho.sum(-1), torch.ones(20), atol=1e-2)  # softplus, not simplex
    torch.testing.assert_close(tr.nodes["x"]["fn"].mean, mb.log_library.exp() * rho)
    m.train(max_epochs=1, **QUIET)
    params = m.get_likelihood_parameters(indices=np.arange(5))
    assert np.isfinite(params["mean"]).all()


@pytest.mark.parametrize("bad, match", [(0.0, "finite and > 0"), (np.nan, "finite and > 0")])
def test_bad_size_factors_are_refused_naming_the_cell(small, bad, match):
    a = small.copy()
    a.obs["sf"] = 1.0
    a.obs.loc[a.obs_names[7], "sf"] = bad
    with pytest.raises(TotalVIDataError, match=f"{match}.*{a.obs_names[7]}"):
        _setup(a, size_factor_key="sf")


def test_panel_indexes_background_prior_and_protein_mask(small):
    a = small.copy()
    # panel p1 spans both batches; protein 0 was not measured in it
    a.obs["panel"] = np.where(np.arange(a.n_obs) % 4 == 0, "p1", "p0")
    pro = a.obsm["protein_expression"].copy()
    pro.iloc[np.flatnonzero(a.obs["panel"] == "p1"), 0] = 0
    a.obsm["protein_expression"] = pro
    _setup(a, panel_key="panel")
    m = TOTALVI(a, **SMALL)
    assert m.module.background_c.shape == (8, 2)  # one column per panel, not per batch
    assert m.data.protein_measured[:, 0].tolist() == [True, False]
    mb = m.data.minibatch(np.arange(12))
    assert mb.kwargs()["panel"].shape == (12, 2)
    assert not mb.protein_mask[0, 0] and mb.protein_mask[1, 0]  # cell 0 is in p1
    tr = poutine.trace(m.module.model).get_trace(*mb.args(), **mb.kwargs())
    # the per-cell background shift (lambda_t b_n) is added to the panel's c_t
    shift = m.module.background_loading * tr.nodes["background_scale"]["value"]
    loc = tr.nodes["beta"]["fn"].base_dist.loc - shift
    panel_code = (a.obs["panel"].to_numpy()[:12] == "p1").astype(int)
    torch.testing.assert_close(loc, m.module.background_c.T[panel_code])
    m.train(max_epochs=1, **QUIET)
    unseen = a.copy()
    unseen.obs["panel"] = "p9"
    with pytest.raises(TotalVIDataError, match="p9"):
        m.get_elbo(unseen)


def test_override_missing_proteins(small):
    a = small.copy()
    pro = a.obsm["protein_expression"].copy()
    pro.iloc[np.flatnonzero(a.obs["batch"] == "batch_1"), 2] = 0
    a.obsm["protein_expression"] = pro
    _setup(a)
    assert not TOTALVI(a, **SMALL).data.protein_measured[1, 2]
    m = TOTALVI(a, override_missing_proteins=True, **SMALL)
    assert m.data.protein_measured.all() and m.init_params["override_missing_proteins"]


# -- TOTALVI(...) keyword arguments ----------------------------------------------------------
def test_scvi_module_settings_accepted_at_their_default_refused_otherwise(small):
    a = _setup(small.copy())
    TOTALVI(a, latent_distribution="normal", gene_likelihood="nb", gene_dispersion="gene",
            use_batch_norm="both", **SMALL)
    with pytest.raises(ValueError, match="rna_likelihood"):
        TOTALVI(a, gene_likelihood="zinb")
    with pytest.raises(TypeError, match="n_hiden.*accepted.*n_hidden"):
        TOTALVI(a, n_hiden=3)


# -- train(...) ------------------------------------------------------------------------------
def test_split_sizes_order_and_external_indexing(small):
    a = _setup(small.copy())
    m = TOTALVI(a, **SMALL).train(1, train_size=0.5, validation_size=0.3, **QUIET)
    sizes = [len(x) for x in (m.train_indices, m.validation_indices, m.test_indices)]
    assert sizes == [100, 60, 40]  # ceil(0.5 n), floor(0.3 n), the rest (scvi-tools' rule)
    all_cells = np.concatenate([m.train_indices, m.validation_indices, m.test_indices])
    assert sorted(all_cells) == list(range(200))
    m.train(1, train_size=0.5, validation_size=0.3, shuffle_set_split=False, **QUIET)
    assert list(m.validation_indices) == list(range(60))  # in data order, validation first
    assert list(m.train_indices) == list(range(60, 160))
    ext = [np.arange(50, 200), np.arange(0, 30), np.arange(30, 50)]
    m.train(1, external_indexing=ext, **QUIET)
    for got, want in zip((m.train_indices, m.validation_indices, m.test_indices), ext):
        assert list(got) == list(want)
    with pytest.raises(ValueError, match="share cells"):
        m.train(1, external_indexing=[np.arange(100), np.arange(50, 150)], **QUIET)
    with pytest.raises(ValueError, match="validation_size"):
        m.train(1, train_size=0.8, validation_size=0.3, **QUIET)


def test_validation_cadence_and_epoch_warmup(small):
    a = _setup(small.copy())
    m = TOTALVI(a, **SMALL).train(4, check_val_every_n_epoch=2, n_epochs_kl_warmup=4,
                                  early_stopping=False, **QUIET)
    h = m.history
    assert h["elbo_validation"].isna().tolist() == [True, False, True, False]
    assert h["elbo_train"].isna().tolist() == [True, False, True, False]
    # epoch e has weight e / 4; epoch 0 uses epoch 1's (Pyro's scale must be > 0)
    np.testing.assert_allclose(h["kl_weight"], [0.25, 0.25, 0.5, 0.75])


def test_kl_weight_schedule_matches_scvi_rule():
    plan = TrainingPlan(n_steps_kl_warmup=10, min_kl_weight=0.2, max_kl_weight=0.8)
    plan.validate(100)
    assert [plan.kl_weight(s) for s in (0, 5, 10, 50)] == pytest.approx([0.2, 0.5, 0.8, 0.8])
    plan = TrainingPlan(n_epochs_kl_warmup=4, n_steps_kl_warmup=1000)
    plan.validate(100)
    assert plan.kl_weight(step=3, epoch=2) == 0.5 and plan.kl_weight(step=0, epoch=9) == 1.0


def test_plan_kwargs_trainer_kwargs_and_clear_errors(small):
    a = _setup(small.copy())
    m = TOTALVI(a, **SMALL)
    m.train(1, plan_kwargs={"lr": 1e-3, "optimizer": "AdamW", "weight_decay": 0.0},
            enable_progress_bar=False, enable_model_summary=False, devices=1)
    assert m.history["lr"].iloc[-1] == pytest.approx(1e-3)  # plan_kwargs' lr was used
    m.train(1, lr=2e-3, plan_kwargs={"weight_decay": 0.0}, **QUIET)
    assert m.history["lr"].iloc[-1] == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="lr given twice"):
        m.train(1, lr=2e-3, plan_kwargs={"lr": 1e-3}, **QUIET)
    with pytest.raises(TypeError, match=r"unexpected \['max_epoch'\].*max_epochs"):
        m.train(max_epoch=1)
    with pytest.raises(TypeError, match="plan_kwargs: unexpected"):
        m.train(1, plan_kwargs={"learning_rate": 1}, **QUIET)
    with pytest.raises(TypeError, match="datasplitter_kwargs: unexpected"):
        m.train(1, datasplitter_kwargs={"shuffle": True}, **QUIET)
    with pytest.warns(UserWarning, match="num_workers"):
        m.train(1, datasplitter_kwargs={"num_workers": 2, "validation_size": 0.1}, **QUIET)
    assert len(m.validation_indices) == 20
    with pytest.raises(ValueError, match="torchrun"):
        m.train(1, devices=2, **QUIET)


# -- queries ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(small):
    a = _setup(small.copy())
    return TOTALVI(a, **SMALL).train(20, seed=0, **QUIET)


def test_latent_representation_return_dist_and_draws(model):
    mean = model.get_latent_representation(indices=np.arange(50))
    loc, var = model.get_latent_representation(indices=np.arange(50), return_dist=True)
    np.testing.assert_array_equal(loc, mean)
    z_loc, z_scale, _, _ = model.module.encode(*model.data.minibatch(np.arange(50)).args())
    np.testing.assert_allclose(var, z_scale.detach().square().numpy(), rtol=1e-6)
    torch.manual_seed(0)
    draws = np.stack([model.get_latent_representation(indices=np.arange(50), give_mean=False)
                      for _ in range(200)])
    np.testing.assert_allclose(draws.var(0), var, rtol=0.35)  # 200 draws: sd of a var ~10%
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * np.sqrt(var.max() / 200))


def test_normalized_expression_n_samples_overall_and_all_draws(model):
    torch.manual_seed(5)
    rna, pro = model.get_normalized_expression(n_samples_overall=30, silent=False)
    assert rna.shape == (30, 30) and pro.shape == (30, 8)
    assert set(rna.index) <= set(model.adata.obs_names)
    torch.manual_seed(5)
    again, _ = model.get_normalized_expression(n_samples_overall=30)
    assert list(again.index) == list(rna.index)  # torch's seed fixes the cells too
    draws, _ = model.get_normalized_expression(indices=[0, 1], n_samples=3, return_mean=False)
    assert draws.shape == (2, 30, 3)  # (cells, genes, draws), as scvi-tools 1.4.2 returns
    one, _ = model.get_normalized_expression(indices=[0, 1], n_samples=1, return_mean=False)
    assert isinstance(one, pd.DataFrame)  # a single draw is a table, as in scvi-tools


def test_posterior_predictive_sample_is_a_dict(model):
    out = model.posterior_predictive_sample(indices=np.arange(10), n_samples=2)
    assert set(out) == {"rna", "protein"}
    assert out["rna"].shape == (10, 30, 2) and out["protein"].shape == (10, 8, 2)
    assert model.posterior_predictive_sample(indices=[0])["rna"].shape == (1, 30)


def test_reconstruction_error_elbo_and_marginal_ll_per_cell(model):
    idx = np.arange(60)
    pyro.set_rng_seed(1)
    rec = model.get_reconstruction_error(indices=idx)
    pyro.set_rng_seed(1)
    per_cell = model.get_reconstruction_error(indices=idx, return_mean=False)
    assert list(rec) == ["reconst_loss_gene", "reconst_loss_protein"]
    for key in rec:
        assert per_cell[key].shape == (60,) and per_cell[key].mean() == pytest.approx(rec[key])
    pyro.set_rng_seed(1)
    from pyro_totalvi.scoring import evaluate

    total = evaluate(model.module, model.data, idx)["reconstruction_loss"]
    assert sum(rec.values()) == pytest.approx(total, rel=1e-6)  # the one scorer's value
    pyro.set_rng_seed(2)
    elbo = model.get_elbo(indices=idx, return_mean=False)
    pyro.set_rng_seed(2)
    assert elbo.shape == (60,) and elbo.mean() == pytest.approx(model.get_elbo(indices=idx))
    mll = model.get_marginal_ll(indices=idx[:8], n_mc_samples=20, return_mean=False)
    # the bound holds for the ELBO, an expectation over q: get_elbo draws q once per cell, and
    # with the per-cell background shift b_n one draw of the protein term varies by tens of nats
    # in this barely trained model, so average 10 draws
    expected_elbo = np.mean([model.get_elbo(indices=idx[:8], return_mean=False)
                             for _ in range(10)], axis=0)
    assert mll.shape == (8,) and (mll > expected_elbo - 5).all()


def test_likelihood_parameters(model):
    p = model.get_likelihood_parameters(indices=np.arange(12))
    lib = model.data.minibatch(np.arange(12)).log_library.exp().numpy()
    np.testing.assert_allclose(p["mean"].sum(1, keepdims=True), lib, rtol=1e-4)  # l * rho
    np.testing.assert_allclose(p["dispersions"][0], model.module.log_theta.exp().detach(),
                               rtol=1e-6)
    assert (p["protein_fore_mean"] >= p["protein_back_mean"]).all()  # alpha >= 1
    assert ((0 <= p["protein_mixing"]) & (p["protein_mixing"] <= 1)).all()
    two = model.get_likelihood_parameters(indices=np.arange(12), n_samples=2)
    assert two["mean"].shape == (2, 12, 30)
    assert model.get_likelihood_parameters(indices=[0], n_samples=2, give_mean=True)[
        "mean"].shape == (1, 30)


# -- differential expression -----------------------------------------------------------------
CHANGE = ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts",
          "delta", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1",
          "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
          "raw_normalized_mean2", "is_de_fdr_0.05"]  # scvi-tools 1.4.2's, in its order
GROUPS = ["comparison", "group1", "group2"]


def test_de_columns_rows_and_order_as_scvi_tools(model):
    kw = dict(n_samples_overall=300, silent=True)
    one = model.differential_expression(groupby="group", group1="group_1", **kw)
    assert list(one.columns) == CHANGE + GROUPS + ["is_protein"]
    assert one.index[one.is_protein].str.endswith("_protein").all() and len(one) == 38
    assert (np.diff(one["proba_de"]) <= 0).all()  # sorted, as scvi-tools
    assert one["comparison"].iloc[0] == "group_1 vs Rest" and one["group2"].iloc[0] == "Rest"
    assert one.loc[one.is_protein, "raw_normalized_mean1"].isna().all()
    pairs = model.differential_expression(idx1=[0, 1, 2], idx2=[3, 4, 5], **kw)
    assert list(pairs.columns) == CHANGE + ["is_protein"]  # no group columns for idx1/idx2
    vanilla = model.differential_expression(groupby="group", group1="group_1", mode="vanilla",
                                            **kw)
    assert list(vanilla.columns[:5]) == ["proba_m1", "proba_m2", "bayes_factor", "scale1",
                                         "scale2"] and "lfc_mean" not in vanilla
    rest = model.differential_expression(groupby="group", **kw)
    assert list(pd.unique(rest["group1"])) == ["group_0", "group_1", "group_2"]
    rna = model.differential_expression(groupby="group", group1="group_1", use_field=["rna"],
                                        **kw)
    assert len(rna) == 30 and not rna.is_protein.any()
    query = model.differential_expression(idx1="group == 'group_1'", **kw)
    np.testing.assert_allclose(query["raw_mean1"].sort_index(),
                               one["raw_mean1"].sort_index())


def test_de_arguments(model):
    kw = dict(groupby="group", group1="group_1", n_samples_overall=300, silent=True)
    with pytest.raises(ValueError, match="batch_correction=True"):
        model.differential_expression(batchid1=["batch_0"], **kw)
    with pytest.raises(TypeError, match="accepted"):
        model.differential_expression(n_draws=3, **kw)
    two = model.differential_expression(test_mode="two", **kw)
    three = model.differential_expression(**kw)
    assert (two["proba_de"] >= three.loc[two.index, "proba_de"] - 1e-12).all()
    est = model.differential_expression(pseudocounts=None, delta=None, cred_interval_lvls=[0.9],
                                        batch_correction=True, batchid1=["batch_0"],
                                        batchid2=["batch_1"], **kw)
    assert est["pseudocounts"].iloc[0] > 0 and est["delta"].iloc[0] >= 0.1
    lo, hi = est["lfc_confidence_interval_0.9_min"], est["lfc_confidence_interval_0.9_max"]
    assert (lo <= est["lfc_median"]).all() and (est["lfc_median"] <= hi).all()
    for option in ("scale_protein", "sample_protein_mixing", "include_protein_background"):
        out = model.differential_expression(**{option: True}, batch_size=50, **kw)
        assert np.isfinite(out["scale1"]).all()
    scaled = model.differential_expression(scale_protein=True, protein_prior_count=0.0, **kw)
    assert scaled.loc[scaled.is_protein, "scale1"].sum() == pytest.approx(1.0, rel=1e-4)


def test_change_mode_probability_is_the_larger_tail():
    """scvi-tools' test_mode="three": max(P(r >= delta), P(r < -delta)), on known draws."""
    s2 = np.ones((4, 2))
    s1 = np.array([[4.0, 0.25], [4.0, 0.25], [1.0, 4.0], [0.25, 1.0]])  # log2 r: 2, 2, 0, -2 ...
    out = _lfc_table(s1, s2, "change", 1.0, 0.0, "three", None)
    np.testing.assert_allclose(out["proba_de"], [0.5, 0.5])  # [2, 2, 0, -2] and [-2, -2, 2, 0]
    two = _lfc_table(s1, s2, "change", 1.0, 0.0, "two", None)
    np.testing.assert_allclose(two["proba_de"], [0.75, 0.75])
    np.testing.assert_allclose(out["lfc_mean"], [0.5, -0.5], atol=1e-6)


# -- save / load, attributes -----------------------------------------------------------------
def test_save_with_prefix_and_data_then_load_without_adata(model, tmp_path):
    model.save(tmp_path, prefix="a_", save_anndata=True)
    model.save(tmp_path, prefix="b_")  # another prefix in the same directory is fine
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save(tmp_path, prefix="a_")
    assert (tmp_path / "a_adata.h5ad").exists() and not (tmp_path / "b_adata.h5ad").exists()
    loaded = TOTALVI.load(tmp_path, prefix="a_")
    np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)
    np.testing.assert_array_equal(loaded.test_indices, model.test_indices)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    assert loaded.is_trained and len(loaded.history) == len(model.history)
    with pytest.raises(ValueError, match="save_anndata=True"):
        TOTALVI.load(tmp_path, prefix="b_")
    TOTALVI.view_setup_args(tmp_path, prefix="b_")


def test_summary_and_setup_views(model, capsys):
    assert model.summary_string.endswith("Training status: Trained") and "n_latent: 4" in repr(model)
    model.view_anndata_setup()
    shown = capsys.readouterr().out
    assert "batch_key: 'batch'" in shown and "200 cells, 30 genes, 8 proteins" in shown
    with pytest.raises(ValueError, match="not setup"):
        model.view_anndata_setup(simulate(20, n_genes=30, n_proteins=8, seed=0))


def test_every_deliberate_difference_is_in_the_readme():
    compare_api = benchmark_module("compare_api")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deliberate differences from scvi-tools")[1].split("\n## ")[0]
    listed = set(re.findall(r"^\| `([^`]+)`", section, flags=re.M))
    assert listed == set(compare_api.DELIBERATE)
