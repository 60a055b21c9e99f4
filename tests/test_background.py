"""Protein background: responsibilities, isotype controls, empty droplets, foreground calls."""

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from scipy.stats import nbinom
from sklearn.metrics import roc_auc_score

from pyro_totalvi import TOTALVI, NegativeBinomialMixture, TotalVIDataError, TotalVIModule, simulate
from pyro_totalvi.data import CiteData
from pyro_totalvi.model import BACKGROUND_ONLY_LOGIT
from pyro_totalvi.scoring import elbo_terms, protein_terms

from .conftest import benchmark_module, shared_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sim_bg():
    """Cells with a per-cell background shift, 3 isotype controls, and 80 empty droplets."""
    return simulate(300, n_genes=60, n_proteins=8, n_batches=2, n_groups=3, seed=4,
                    background_cell_sd=0.5, n_isotypes=3, n_empty_droplets=80)


def _registered(sim_bg, **kw):
    a = sim_bg[0].copy()
    TOTALVI.setup_anndata(a, batch_key="batch", **kw)
    return a


# -- the responsibility ---------------------------------------------------------------------------
def test_first_component_probability_is_bayes_rule():
    y = torch.tensor([0.0, 3.0, 12.0, 40.0])
    mu1, mu2, theta, w = torch.tensor(4.0), torch.tensor(20.0), torch.tensor(5.0), torch.tensor(0.3)
    got = NegativeBinomialMixture(mu1, mu2, theta, w).first_component_probability(y)

    def nb(mu):  # scipy's NB(n, p) with mean mu, inverse dispersion theta
        return nbinom.pmf(y.numpy(), theta.item(), theta.item() / (theta.item() + mu.item()))

    pi = 1 / (1 + np.exp(-w.item()))
    expected = pi * nb(mu1) / (pi * nb(mu1) + (1 - pi) * nb(mu2))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert got[0] > pi > got[-1]  # a count at the background level favours the background


def test_foreground_probability_uses_the_counts(trained):
    """Same model, two meanings: the responsibility ranks the true foreground better than the
    prior weight 1 - pi (the simulator draws v per cell, which z cannot predict)."""
    truth = 1 - trained.adata.obsm["true_v"]
    post = trained.get_protein_foreground_probability(n_samples=3)
    prior = trained.get_protein_foreground_probability(n_samples=3, given_counts=False)
    auc_post = roc_auc_score(truth.ravel(), post.to_numpy().ravel())
    auc_prior = roc_auc_score(truth.ravel(), prior.to_numpy().ravel())
    assert auc_post > auc_prior and auc_post >= 0.9, (auc_post, auc_prior)
    with pytest.raises(ValueError, match="given_counts=False"):
        trained.get_protein_foreground_probability(transform_batch="batch_0", given_counts=True)
    # with transform_batch the default is the prior weight (scvi-tools' meaning)
    tb = trained.get_protein_foreground_probability(indices=[0, 1], transform_batch="batch_0")
    assert tb.shape == (2, 12) and np.isfinite(tb.to_numpy()).all()


def test_sample_protein_mixing_draws_v_given_the_counts(trained):
    """With the responsibility, a drawn v is background where the posterior says so: its mean
    over many draws matches E[(1 - w) beta alpha] computed without sampling."""
    idx = np.arange(40)
    torch.manual_seed(0)
    _, mean = trained.get_normalized_expression(indices=idx, n_samples=200)
    torch.manual_seed(0)
    _, drawn = trained.get_normalized_expression(indices=idx, n_samples=200,
                                                 sample_protein_mixing=True)
    ratio = drawn.to_numpy().mean(0) / mean.to_numpy().mean(0)
    np.testing.assert_allclose(ratio, 1.0, atol=0.15)


# -- model ------------------------------------------------------------------------------------------
def _module(data, **kw):
    torch.manual_seed(0)
    return TotalVIModule(data.n_genes, data.n_proteins, data.n_batches, n_latent=4, n_hidden=16,
                         **kw).eval()


def test_isotypes_are_background_only_in_both_forms(sim_bg):
    a = _registered(sim_bg, isotype_controls=sim_bg[0].uns["isotype_controls"])
    data = CiteData(a)
    iso = [8, 9, 10]
    m = _module(data, isotype_controls=iso, min_foreground_ratio=2.0)
    mb = data.minibatch(np.arange(30))
    with torch.no_grad():
        rho, alpha, logits = m.decode(torch.randn(30, 4), mb.s)
        mix = m.protein_likelihood(torch.full((30, 11), 5.0), alpha, logits)
        nb = m.protein_likelihood(torch.full((30, 11), 5.0), alpha, logits, v=torch.ones(30, 11))
        np.testing.assert_allclose(mix.log_prob(mb.y)[:, iso], nb.log_prob(mb.y)[:, iso],
                                   rtol=1e-6)
    assert (logits[:, iso] == BACKGROUND_ONLY_LOGIT).all() and (alpha >= 2.0).all()
    # enumerating v gives the same ELBO as summing it out analytically, isotypes included
    losses = []
    for form, elbo in (("marginal", Trace_ELBO()), ("enumerate", TraceEnum_ELBO(max_plate_nesting=2))):
        m.protein_mixture = form
        pyro.set_rng_seed(0)
        losses.append(elbo.loss(m.model, m.guide, *mb.args()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert np.isfinite(losses).all()


def test_droplet_term_is_unbiased_under_subsampling(sim_bg):
    """Summed over a partition of the droplets into subsamples, the plate-scaled droplet terms
    average to the full-data term: the minibatch estimate is unbiased."""
    a = _registered(sim_bg, empty_droplets=sim_bg[1])
    data = CiteData(a)
    m = _module(data, empty_droplets=True)
    droplets = data.droplets
    beta = torch.rand(droplets.n_obs, data.n_proteins) * 20 + 1

    def term(idx):
        batch = droplets.minibatch(idx)
        tr = poutine.trace(poutine.condition(m.droplet_model, {"droplet_beta": beta[batch.idx]})
                           ).get_trace(batch)
        return tr.log_prob_sum()  # each site's log density times its plate's n_obs / B

    full = term(np.arange(droplets.n_obs))
    parts = np.array_split(np.random.default_rng(0).permutation(droplets.n_obs), 4)
    assert np.mean([term(p).item() for p in parts]) == pytest.approx(full.item(), rel=1e-5)


def test_droplets_train_and_stay_out_of_cell_elbo(sim_bg, tmp_path):
    a = _registered(sim_bg, isotype_controls=sim_bg[0].uns["isotype_controls"],
                    empty_droplets=sim_bg[1])
    m = TOTALVI(a, n_latent=4, n_hidden=32)
    assert m.module.empty_droplets and m.module.isotype_mask.sum() == 3
    m.train(max_epochs=3, progress_bar=False)
    assert np.isfinite(m.history[["elbo_validation", "elbo_droplets"]].to_numpy()).all()
    # the per-cell ELBO has the cells' sites only: droplets are not cells of the query
    torch.manual_seed(1)
    terms = elbo_terms(m.module, m.data, np.arange(50))
    assert "droplet_y" not in terms and "background_scale" in terms
    torch.manual_seed(1)
    per_protein = protein_terms(m.module, m.data, np.arange(50))
    assert per_protein["y"].sum() == pytest.approx(-terms["y"], rel=1e-5)
    # save / load round trip: isotypes, droplets and parameters come back
    m.save(tmp_path / "m")
    loaded = TOTALVI.load(tmp_path / "m", sim_bg[0].copy())
    assert list(loaded.registry["isotype_controls"]) == ["isotype_0", "isotype_1", "isotype_2"]
    np.testing.assert_array_equal(loaded.data.droplets.Y, m.data.droplets.Y)
    np.testing.assert_allclose(loaded.get_latent_representation(),
                               m.get_latent_representation(), rtol=1e-5)
    for key, value in m.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value.cpu()), key
    loaded.train(max_epochs=1, progress_bar=False)  # and it trains on, with its droplets


# -- registration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("names,match", [
    (["isotype_0", "CD999"], r"\['CD999'\] are not proteins"),
    (["isotype_0", "isotype_0"], r"\['isotype_0'\] more than once"),
    ("all", "declares all 11 proteins"),
])
def test_bad_isotype_declarations(sim_bg, names, match):
    a = sim_bg[0].copy()
    if names == "all":
        names = list(a.obsm["protein_expression"].columns)
    with pytest.raises(TotalVIDataError, match=match):
        TOTALVI.setup_anndata(a, batch_key="batch", isotype_controls=names)
    assert "_pyro_totalvi" not in a.uns


def _bad_droplets(droplets, kind):
    d = droplets.copy()
    pro = d.obsm["protein_expression"]
    if kind == "missing protein":
        d.obsm["protein_expression"] = pro.drop(columns=["protein_3"])
    elif kind == "unknown protein":
        d.obsm["protein_expression"] = pro.rename(columns={"protein_3": "CD999"})
    elif kind == "non-integer":
        pro.iloc[2, 1] = 1.5
    elif kind == "negative":
        pro.iloc[2, 1] = -1
    elif kind == "few per batch":  # keep 5 droplets of batch_1
        extra = np.flatnonzero(d.obs["batch"] == "batch_1")[5:]
        d = d[np.setdiff1d(np.arange(d.n_obs), extra)].copy()
    elif kind == "no batch column":
        d.obs = d.obs.drop(columns=["batch"])
    elif kind == "unknown batch":
        d.obs["batch"] = d.obs["batch"].astype(str).replace("batch_1", "batch_9")
    return d


@pytest.mark.parametrize("kind,match", [
    ("missing protein", r"missing \['protein_3'\]"),
    ("unknown protein", r"not in the cells \['CD999'\]"),
    ("non-integer", "non-integer"),
    ("negative", "negative"),
    ("few per batch", r"at least 10 droplets per batch.*'batch_1': 5"),
    ("no batch column", "no 'batch' column"),
    ("unknown batch", r"batch_9"),
])
def test_bad_empty_droplets(sim_bg, kind, match):
    a = sim_bg[0].copy()
    droplets = _bad_droplets(sim_bg[1], kind)
    before = droplets.copy()
    with pytest.raises(TotalVIDataError, match=match):
        TOTALVI.setup_anndata(a, batch_key="batch", empty_droplets=droplets)
    assert "_pyro_totalvi" not in a.uns
    pd.testing.assert_frame_equal(droplets.obsm["protein_expression"],
                                  before.obsm["protein_expression"])


def test_registration_leaves_user_data_alone(sim_bg):
    a, droplets = sim_bg[0].copy(), sim_bg[1].copy()
    a_before, d_before = a.copy(), droplets.copy()
    # the droplets' protein columns in another order: matched by name
    droplets.obsm["protein_expression"] = droplets.obsm["protein_expression"].iloc[:, ::-1]
    TOTALVI.setup_anndata(a, batch_key="batch", isotype_controls=["isotype_2", "isotype_0"],
                          empty_droplets=droplets)
    reg = a.uns["_pyro_totalvi"]
    assert reg["isotype_controls"] == ["isotype_0", "isotype_2"]  # registry (column) order
    np.testing.assert_array_equal(reg["empty_droplets"]["protein_counts"],
                                  d_before.obsm["protein_expression"].to_numpy())
    assert set(a.uns) == set(a_before.uns) | {"_pyro_totalvi"}
    pd.testing.assert_frame_equal(a.obsm["protein_expression"],
                                  a_before.obsm["protein_expression"])
    assert (a.X != a_before.X).nnz == 0 and a.obs.equals(a_before.obs)


def test_setup_mudata_with_isotypes_and_droplets(sim_bg):
    md = pytest.importorskip("mudata", reason="mudata is not installed")
    a, droplets = sim_bg
    rna = ad.AnnData(X=a.X.copy(), obs=a.obs[["batch"]].copy(), var=a.var.copy())
    pro = a.obsm["protein_expression"]
    prot = ad.AnnData(X=pro.to_numpy(), obs=pd.DataFrame(index=a.obs_names),
                      var=pd.DataFrame(index=pro.columns))
    mdata = md.MuData({"rna": rna, "prot": prot})
    dprot = ad.AnnData(X=droplets.obsm["protein_expression"].to_numpy(),
                       obs=droplets.obs[["batch"]].copy(),
                       var=pd.DataFrame(index=droplets.obsm["protein_expression"].columns))
    with pytest.raises(TotalVIDataError, match="CD999"):
        TOTALVI.setup_mudata(mdata, batch_key="batch", isotype_controls=["CD999"])
    TOTALVI.setup_mudata(mdata, batch_key="batch", isotype_controls=["isotype_1"],
                         empty_droplets=dprot)
    m = TOTALVI(mdata, n_latent=4, n_hidden=16)
    assert m.module.isotype_controls == [9] and m.data.droplets.n_obs == droplets.n_obs


# -- simulator --------------------------------------------------------------------------------------
def _sim_hash(a) -> str:
    h = hashlib.sha256()
    for arr in (a.X.toarray(), a.obsm["protein_expression"].to_numpy(), a.obsm["true_v"],
                a.obsm["true_beta"], a.obsm["true_z"], a.obs["true_library"].to_numpy(),
                a.obs["group"].cat.codes.to_numpy(), a.obs["batch"].cat.codes.to_numpy()):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def test_simulator_defaults_unchanged_and_background_truth(sim_bg):
    # the hash of simulate()'s output before the background options existed
    a = simulate(300, n_genes=40, n_proteins=6, n_batches=2, seed=7, chunk_size=128)
    assert _sim_hash(a) == "14ba03fe53ddbe90b05d5627f50fd2feb8d0c9cf690cb28706624f1f5765ac18"
    cells, droplets = sim_bg
    iso = cells.uns["isotype_controls"]
    assert (cells.obsm["true_v"][:, -3:] == 1).all() and len(iso) == 3
    assert list(droplets.obsm["protein_expression"].columns) == list(
        cells.obsm["protein_expression"].columns)
    # droplets hold droplet_background_ratio (0.5) x the cells' background, without the shift
    shift = np.exp(cells.obs["true_background_shift"].to_numpy())[:, None]
    ratio = (np.median(droplets.obsm["true_beta"], 0)
             / np.median(cells.obsm["true_beta"] / shift, 0))
    np.testing.assert_allclose(ratio, 0.5, rtol=0.35)
    # a weak foreground: the simulated alpha stays small
    weak = simulate(200, n_genes=20, n_proteins=4, seed=1, foreground_ratio=(1.5, 3.0),
                    foreground_fraction=1.0)
    assert (1 - weak.obsm["true_v"]).mean() > 0.85


# -- the claims, small: held-out isotype, AUC against the baseline, protein ELBO ------------------
BEFORE = {"min_foreground_ratio": 1.0, "background_preference": 1e-3,
          "background_cell_scale": False}


@pytest.fixture(scope="module")
def claims():
    """Simulated cells with a per-cell background shift and 3 isotypes; models trained as on
    main before this change ("before") and now with 2 of the 3 isotypes declared."""
    a = simulate(400, n_genes=50, n_proteins=8, n_batches=2, n_groups=3, seed=2,
                 background_cell_sd=0.5, n_isotypes=3)
    iso = list(a.uns["isotype_controls"])
    models = {}
    for label, declared, module in (("before", [], BEFORE), ("isotypes", iso[:2], {})):
        b = a.copy()
        TOTALVI.setup_anndata(b, batch_key="batch", isotype_controls=declared or None)
        m = TOTALVI(b, n_latent=6, n_hidden=32, **module)
        m.train(max_epochs=50, batch_size=64, n_steps_kl_warmup=150, seed=0,
                progress_bar=False, early_stopping=False)
        models[label] = m
    return a, iso, models


def test_held_out_isotype_is_background(claims):
    a, iso, models = claims
    fg = models["isotypes"].get_protein_foreground_probability(n_samples=5)
    assert (fg[iso[:2]].to_numpy() == 0).all()  # declared: background by construction
    assert fg[iso[2]].mean() < 0.10, fg[iso[2]].mean()  # held out: what the claim is about
    before = models["before"].get_protein_foreground_probability(n_samples=5,
                                                                 given_counts=False)
    assert before[iso[2]].mean() > fg[iso[2]].mean()


def test_auc_beats_log_ratio_baseline_and_elbo_holds(claims):
    bg = benchmark_module("background")
    auc, log_ratio_baseline, protein_elbo = bg.auc, bg.log_ratio_baseline, bg.protein_elbo
    a, iso, models = claims
    proteins = [p for p in a.obsm["protein_expression"].columns if p not in iso]
    truth = 1 - a.obsm["true_v"][:, : len(proteins)]
    ours = auc(truth, models["isotypes"].get_protein_foreground_probability(
        protein_list=proteins, n_samples=5).to_numpy())
    baseline = auc(truth, log_ratio_baseline(a.obsm["protein_expression"][proteins].to_numpy(),
                                             a.obs["batch"].to_numpy()))
    assert ours >= 0.9 and ours >= baseline, (ours, baseline)
    held_out = models["before"].split["validation"]
    elbo = {k: protein_elbo(m, held_out, proteins) for k, m in models.items()}
    assert elbo["isotypes"] >= elbo["before"] - 0.01 * abs(elbo["before"]), elbo


def test_positive_calls_and_summary(claims):
    a, iso, models = claims
    m = models["isotypes"]
    calls = m.get_protein_positive_calls(threshold=0.5, n_samples=3)
    assert calls.dtypes.eq(bool).all() and not calls[iso[:2]].any().any()
    summary = m.get_protein_foreground_summary(n_samples=3)
    assert list(summary.index) == list(a.obsm["protein_expression"].columns)
    assert summary.loc[iso[:2], "isotype_control"].all() and not summary.loc[iso[2],
                                                                              "isotype_control"]
    # the background level per batch is near the true one where the background is seen (in
    # most cells; a protein foreground nearly everywhere needs empty droplets for it)
    seen = (a.obsm["true_v"].mean(0) > 0.5)
    for b in ("batch_0", "batch_1"):
        true_bg = a.obsm["true_beta"][(a.obs["batch"] == b).to_numpy()].mean(0)
        ratio = summary[f"background_mean_{b}"].to_numpy() / true_bg
        assert ((ratio > 0.5) & (ratio < 2))[seen].all(), ratio
    # fraction positive follows the truth: foreground in about the fraction of cells it is
    truth = 1 - a.obsm["true_v"][:, :8].mean(0)
    np.testing.assert_allclose(summary["fraction_positive"].iloc[:8], truth, atol=0.1)
    with pytest.raises(ValueError, match="threshold"):
        m.get_protein_positive_calls(threshold=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name,held_out", [("eccite_pbmc_500.h5ad", "IgG2a"),
                                           ("pbmc1k_protein_v3.h5ad", "IgG1_control_TotalSeqB")])
def test_real_held_out_isotype_is_background(name, held_out):
    from pyro_totalvi.__main__ import _select_genes

    a = _select_genes(ad.read_h5ad(shared_file(name)), 2000)
    declared = [str(i) for i in a.uns["isotype_controls"] if i != held_out]
    TOTALVI.setup_anndata(a, batch_key="batch" if "batch" in a.obs else None,
                          isotype_controls=declared)
    m = TOTALVI(a)
    m.train(max_epochs=100, seed=0, progress_bar=False, early_stopping=False)
    fg = m.get_protein_foreground_probability(n_samples=10)
    assert fg[held_out].mean() < 0.10, fg[held_out].mean()
