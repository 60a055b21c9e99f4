"""Modality weights (a tempered posterior) and per-cell modality shares.

Known answers: simulated data whose groups differ in the proteins only (the RNA carries no group
signal) must give a much larger protein share than data whose groups differ in the RNA only, and
raising the protein weight must raise the protein share.
"""

import json

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_totalvi import TOTALVI, TotalVIModule, simulate
from pyro_totalvi.data import CiteData
from pyro_totalvi.modality import modality_reference, modality_shares
from pyro_totalvi.scoring import evaluate, score_minibatch

pytestmark = pytest.mark.usefixtures("one_thread")


def _sim(rna=True, protein=True, seed=1, n=400):
    a = simulate(n, n_genes=50, n_proteins=20, n_batches=2, n_groups=4, seed=seed,
                 rna_group_signal=rna, protein_group_signal=protein)
    TOTALVI.setup_anndata(a, batch_key="batch")
    return a


def _trained(adata, protein_weight=1.0, epochs=40, seed=1):
    m = TOTALVI(adata, n_latent=10, n_hidden=32, seed=seed,
                modality_weights={"protein": protein_weight})
    m.train(max_epochs=epochs, seed=seed, progress_bar=False, n_steps_kl_warmup=40)
    return m


@pytest.fixture
def tiny():
    """200 cells, 40 genes, 6 proteins (no background-prior fit: quick to build)."""
    a = simulate(200, n_genes=40, n_proteins=6, n_batches=2, seed=0)
    TOTALVI.setup_anndata(a, batch_key="batch")
    return a


@pytest.fixture(scope="module")
def small_model():
    """Briefly trained on 300 cells in 4 groups (parameters need not be good here)."""
    a = simulate(300, n_genes=60, n_proteins=8, n_batches=2, n_groups=4, seed=2)
    TOTALVI.setup_anndata(a, batch_key="batch")
    m = TOTALVI(a, n_latent=5, n_hidden=32)
    m.train(max_epochs=3, seed=0, progress_bar=False)
    return m


# ---------------------------------------------------------------------------------------------
# the weights
@pytest.mark.parametrize("weights,match", [
    ({"atac": 1.0}, "unknown keys"), ({"rna": 0}, "> 0"), ({"protein": -1.0}, "> 0"),
    ({"protein": float("nan")}, "> 0"), ({"rna": float("inf")}, "> 0"),
    ({"rna": "two"}, "number"), ([1.0, 2.0], "dict"),
])
def test_bad_weights_are_named(weights, match):
    with pytest.raises(ValueError, match=match):
        TotalVIModule(10, 4, n_latent=2, n_hidden=8, modality_weights=weights)


def test_the_model_class_passes_the_weights_on(tiny):
    with pytest.raises(ValueError, match="unknown keys"):
        TOTALVI(tiny, modality_weights={"adt": 2.0})
    m = TOTALVI(tiny, modality_weights={"protein": 3})
    assert m.module.modality_weights == {"rna": 1.0, "protein": 3.0}


def test_weight_one_reproduces_the_unweighted_model(tiny):
    runs = []
    for kwargs in ({}, {"modality_weights": {"rna": 1, "protein": 1.0}}):
        m = TOTALVI(tiny, n_latent=5, n_hidden=32, **kwargs)
        m.train(max_epochs=2, seed=7, progress_bar=False)
        runs.append((m.history, m.module.state_dict()))
    np.testing.assert_array_equal(runs[0][0].to_numpy(), runs[1][0].to_numpy())
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


@pytest.mark.parametrize("mixture", ["marginal", "enumerate"])
def test_a_weight_multiplies_exactly_its_modalitys_log_likelihood(tiny, mixture):
    """Training loss at weights (a, b) minus at (1, 1) = -(a - 1) log p(x) - (b - 1) log p(y),
    with log p from the scorer at the same guide draw (v summed out in both)."""
    data = CiteData(tiny)
    mb = data.minibatch(np.arange(64))
    module = TotalVIModule(data.n_genes, data.n_proteins, data.n_batches, n_latent=5,
                           n_hidden=16, protein_mixture=mixture).eval()
    elbo = TraceEnum_ELBO(max_plate_nesting=2) if mixture == "enumerate" else Trace_ELBO()

    def loss(a, b):
        module.modality_weights = {"rna": a, "protein": b}
        pyro.set_rng_seed(3)
        return elbo.loss(module.model, module.guide, *mb.args())

    pyro.set_rng_seed(3)
    terms, _ = score_minibatch(module, mb, len(mb.idx))
    log_px, log_py = terms["x"].sum().item(), terms["y"].sum().item()
    base = loss(1.0, 1.0)
    assert loss(2.5, 1.0) - base == pytest.approx(-1.5 * log_px, rel=1e-4)
    assert loss(1.0, 0.5) - base == pytest.approx(0.5 * log_py, rel=1e-4)


def test_reported_likelihoods_ignore_the_weights(small_model):
    """Same parameters, other weights: every reported value is the same (weight 1)."""
    other = TOTALVI(small_model.adata, n_latent=5, n_hidden=32,
                    modality_weights={"rna": 0.3, "protein": 4.0})
    other.module.load_state_dict(small_model.module.state_dict())
    other.module.eval()

    def reported(m):
        out = []
        for query in (lambda: m.get_elbo(), lambda: m.get_reconstruction_error(),
                      lambda: m.get_marginal_ll(indices=np.arange(40), n_mc_samples=3),
                      lambda: evaluate(m.module, m.data, np.arange(100))):
            pyro.set_rng_seed(5)
            out.append(query())
        return out

    assert reported(small_model) == reported(other)


def test_save_load_keeps_the_weights(tiny, tmp_path):
    m = TOTALVI(tiny, n_latent=5, n_hidden=16, modality_weights={"protein": np.float32(2.0)})
    m.train(max_epochs=1, seed=0, progress_bar=False)
    m.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "settings.json").read_text())
    assert saved["init_params"]["modality_weights"] == {"rna": 1.0, "protein": 2.0}
    back = TOTALVI.load(tmp_path / "m", tiny)
    assert back.module.modality_weights == {"rna": 1.0, "protein": 2.0}
    np.testing.assert_allclose(back.get_modality_contributions(), m.get_modality_contributions(),
                               atol=1e-6)


def test_resuming_with_other_weights_is_refused(tiny, tmp_path):
    m = TOTALVI(tiny, n_latent=5, n_hidden=16, modality_weights={"protein": 2.0})
    m.train(max_epochs=1, seed=0, progress_bar=False, checkpoint_dir=tmp_path)
    other = TOTALVI(tiny, n_latent=5, n_hidden=16)
    with pytest.raises(ValueError, match="modality_weights"):
        other.train(max_epochs=2, seed=0, progress_bar=False, checkpoint_dir=tmp_path,
                    resume=True)


# ---------------------------------------------------------------------------------------------
# the shares
def test_shares_are_a_distribution_per_cell_in_the_order_asked(small_model):
    full = small_model.get_modality_contributions()
    assert list(full.columns) == ["rna", "protein"]
    assert list(full.index) == list(small_model.adata.obs_names)
    np.testing.assert_allclose(full.sum(1), 1.0, atol=1e-6)
    assert ((full >= 0) & (full <= 1)).all().all()
    idx = np.array([5, 1, 250, 3])
    part = small_model.get_modality_contributions(indices=idx, batch_size=3)
    assert list(part.index) == list(small_model.adata.obs_names[idx])
    np.testing.assert_allclose(part.to_numpy(), full.to_numpy()[idx], atol=1e-5)


class _LinearEncoder(TotalVIModule):
    """mean = A log1p(x) + C log1p(y) and known scales: Shapley parts are A du_x and C du_y."""

    def encode(self, x, y, s, log_library=None, covariates=None, protein_mask=None):
        if protein_mask is not None:
            y = y * protein_mask
        loc = torch.log1p(x) @ self.A + torch.log1p(y) @ self.C
        return loc, self.sigma.expand_as(loc), None, None


def test_shares_match_the_definition_for_a_linear_encoder(tiny):
    data = CiteData(tiny)
    module = _LinearEncoder(data.n_genes, data.n_proteins, data.n_batches, n_latent=3,
                            n_hidden=8)
    gen = torch.Generator().manual_seed(0)
    module.A = torch.randn(data.n_genes, 3, generator=gen) / 10
    module.C = torch.randn(data.n_proteins, 3, generator=gen)
    module.sigma = torch.tensor([0.5, 1.0, 2.0])
    x_ref, y_ref = modality_reference(data, chunk_size=100)
    # the reference: per-batch mean of log1p counts
    lx = np.log1p(data.X.toarray())
    for b in range(data.n_batches):
        np.testing.assert_allclose(np.log1p(x_ref[b]), lx[data.batch == b].mean(0), rtol=1e-4,
                                   atol=1e-5)
    idx = np.arange(30)
    mb = data.minibatch(idx)
    got = modality_shares(module, mb, torch.from_numpy(x_ref), torch.from_numpy(y_ref)).numpy()
    b = data.batch[idx]
    e_rna = (((lx[idx] - np.log1p(x_ref[b])) @ module.A.numpy() / module.sigma.numpy()) ** 2).sum(1)
    ly = np.log1p(data.Y[idx]) - np.log1p(y_ref[b])
    e_pro = ((ly @ module.C.numpy() / module.sigma.numpy()) ** 2).sum(1)
    np.testing.assert_allclose(got[:, 1], e_pro / (e_rna + e_pro), rtol=1e-3, atol=1e-5)


def test_unmeasured_proteins_get_protein_share_zero():
    a = simulate(200, n_genes=40, n_proteins=6, n_batches=2, seed=0)
    mask = pd.DataFrame(True, index=["batch_0", "batch_1"],
                        columns=a.obsm["protein_expression"].columns)
    mask.loc["batch_1"] = False  # batch_1 measured no protein at all
    TOTALVI.setup_anndata(a, batch_key="batch", protein_mask=mask)
    m = TOTALVI(a, n_latent=5, n_hidden=16)
    m.train(max_epochs=2, seed=0, progress_bar=False)
    shares = m.get_modality_contributions()
    in_b1 = (a.obs["batch"] == "batch_1").to_numpy()
    assert (shares["protein"][in_b1] == 0).all() and (shares["rna"][in_b1] == 1).all()
    assert (shares["protein"][~in_b1] > 0).all()
    # per-cell mask: the cells without any measured protein, and only they, get 0
    cell_mask = np.ones((a.n_obs, 6), dtype=bool)
    cell_mask[:7] = False
    cell_mask[7:12, :3] = False
    a.obsm["measured"] = cell_mask
    TOTALVI.setup_anndata(a, batch_key="batch", protein_mask="measured")
    m = TOTALVI(a, n_latent=5, n_hidden=16)
    m.train(max_epochs=2, seed=0, progress_bar=False)
    protein = m.get_modality_contributions()["protein"].to_numpy()
    assert (protein[:7] == 0).all() and (protein[7:] > 0).all()


def test_cost_is_four_encoder_passes(small_model, monkeypatch):
    rows = []
    encode = small_model.module.encode
    monkeypatch.setattr(small_model.module, "encode", lambda x, *a: rows.append(len(x)) or
                        encode(x, *a))
    small_model.get_latent_representation()
    latent_rows = sum(rows)
    rows.clear()
    small_model.get_modality_contributions()
    assert sum(rows) == 4 * latent_rows


def test_summary_by_group(small_model):
    shares = small_model.get_modality_contributions()
    table = small_model.modality_contributions_by_group("group", contributions=shares)
    groups = small_model.adata.obs["group"]
    expected = shares.groupby(groups.to_numpy()).mean()
    np.testing.assert_allclose(table.loc[expected.index, ["rna", "protein"]], expected,
                               rtol=1e-6)
    assert table["n_cells"].sum() == small_model.adata.n_obs
    assert table["protein"].is_monotonic_decreasing
    np.testing.assert_allclose(table.loc["group_0", "protein_sd"],
                               shares["protein"][(groups == "group_0").to_numpy()].std(ddof=0),
                               rtol=1e-5)
    with pytest.raises(KeyError, match="nope"):
        small_model.modality_contributions_by_group("nope")


# ---------------------------------------------------------------------------------------------
# known answers
def test_simulated_signal_sits_in_the_modality_asked_for():
    """Without a modality's group signal, a 5-NN classifier on that modality is near chance."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    def knn(features, groups):
        return cross_val_score(KNeighborsClassifier(5), features, groups, cv=3).mean()

    for rna, protein in ((False, True), (True, False)):
        a = _sim(rna, protein, n=600)
        x = a.X.toarray()
        x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
        y = np.log1p(a.obsm["protein_expression"].to_numpy())
        g = a.obs["group"].to_numpy()
        with_signal, without = (x, y) if rna else (y, x)
        assert knn(with_signal, g) > 0.9 and knn(without, g) < 0.4  # 4 groups: chance 0.25
    assert not _sim(False, True).var["de"].any()
    assert not _sim(True, False).uns["protein_de"].any()
    same = [_sim(r, p) for r, p in ((True, True), (False, True), (True, False))]
    for other in same[1:]:  # the same cells, only the signal moved
        np.testing.assert_array_equal(other.obsm["true_z"], same[0].obsm["true_z"])
    np.testing.assert_array_equal(same[2].X.toarray(), same[0].X.toarray())


def test_protein_only_signal_gives_a_larger_protein_share_than_rna_only():
    protein_only = _trained(_sim(rna=False, protein=True)).get_modality_contributions()
    rna_only = _trained(_sim(rna=True, protein=False)).get_modality_contributions()
    gap = protein_only["protein"].mean() - rna_only["protein"].mean()
    print(f"mean protein share: protein-only signal {protein_only['protein'].mean():.3f}, "
          f"RNA-only {rna_only['protein'].mean():.3f}")
    assert gap >= 0.2, gap


def test_raising_the_protein_weight_raises_the_protein_share():
    a = _sim()
    low, high = (_trained(a, w).get_modality_contributions()["protein"].mean()
                 for w in (0.5, 2.0))
    print(f"mean protein share: weight 0.5 {low:.3f}, weight 2 {high:.3f}")
    assert high > low + 0.02, (low, high)
