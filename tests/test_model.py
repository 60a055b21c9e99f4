"""The Pyro model and guide: shapes, enumerate == marginal, minibatch scaling, Pyro interop."""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

from pyro_totalvi import TotalVIModule
from pyro_totalvi.data import CiteData

from .conftest import ROOT


def _batch(adata, n=64):
    data = CiteData(adata)
    return data, data.minibatch(np.arange(n))


def _module(data, **kw):
    torch.manual_seed(0)
    return TotalVIModule(data.n_genes, data.n_proteins, data.n_batches, n_latent=6, n_hidden=32,
                         **kw).eval()


@pytest.mark.parametrize("observed", [True, False])
def test_trace_shapes_with_validation(adata, observed):
    data, mb = _batch(adata)
    m = _module(data, use_observed_lib_size=observed, protein_mixture="enumerate")
    B, G, T = 64, data.n_genes, data.n_proteins
    with pyro.validation_enabled(True):
        guide_tr = poutine.trace(m.guide).get_trace(*mb.args())
        model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(*mb.args())
        model_tr.compute_log_prob()
        # TraceEnum_ELBO checks every site against the declared plates
        TraceEnum_ELBO(max_plate_nesting=2, strict_enumeration_warning=True).loss(
            m.model, m.guide, *mb.args())
    assert model_tr.nodes["z"]["value"].shape == (B, 1, 6)
    assert model_tr.nodes["x"]["value"].shape == (B, G)
    assert model_tr.nodes["y"]["value"].shape == (B, T)
    assert model_tr.nodes["beta"]["value"].shape == (B, T)
    assert model_tr.nodes["v"]["fn"].batch_shape == (B, T)
    assert ("l" in model_tr.nodes) == (not observed)
    if not observed:
        assert model_tr.nodes["l"]["value"].shape == (B, 1)
    assert {f.name for f in model_tr.nodes["y"]["cond_indep_stack"]} == {"cells", "proteins"}
    assert {f.name for f in model_tr.nodes["x"]["cond_indep_stack"]} == {"cells", "genes"}


@pytest.mark.parametrize("observed", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_enumerate_equals_marginal(adata, observed, masked):
    data, mb = _batch(adata)
    m = _module(data, use_observed_lib_size=observed)
    args = list(mb.args())
    if masked:
        args[5] = torch.rand(64, data.n_proteins, generator=torch.Generator().manual_seed(1)) > 0.3
    pyro.set_rng_seed(3)
    marginal = Trace_ELBO().loss(m.model, m.guide, *args, idx=mb.idx, n_obs=600, kl_weight=0.3)
    m.protein_mixture = "enumerate"
    pyro.set_rng_seed(3)  # same draws of z, l and beta
    enumerated = TraceEnum_ELBO(max_plate_nesting=2).loss(m.model, m.guide, *args, idx=mb.idx,
                                                          n_obs=600, kl_weight=0.3)
    assert abs(marginal - enumerated) / abs(marginal) < 1e-5
    # and the number is not trivially equal to a different configuration
    pyro.set_rng_seed(3)
    other = TraceEnum_ELBO(max_plate_nesting=2).loss(m.model, m.guide, *args, idx=mb.idx,
                                                     n_obs=600, kl_weight=1.0)
    assert abs(other - enumerated) / abs(enumerated) > 1e-4


@pytest.mark.parametrize("warmup", [True, False])
def test_protein_warmup_scales_the_protein_likelihood_only(adata, warmup):
    data, mb = _batch(adata)
    m = _module(data, protein_warmup=warmup)
    kw = dict(idx=mb.idx, n_obs=600, kl_weight=0.3)
    guide_tr = poutine.trace(m.guide).get_trace(*mb.args(), **kw)
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(*mb.args(), **kw)
    plate = 600 / 64  # the cell plate's subsampling scale
    scale = {k: float(model_tr.nodes[k]["scale"]) for k in ("x", "y", "z", "beta")}
    assert scale["x"] == pytest.approx(plate)  # RNA always at full weight
    assert scale["z"] == pytest.approx(0.3 * plate) and scale["beta"] == pytest.approx(0.3 * plate)
    assert scale["y"] == pytest.approx((0.3 if warmup else 1.0) * plate)
    # with kl_weight=1 (every reported ELBO) the setting makes no difference
    full = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(*mb.args(), idx=mb.idx,
                                                                          n_obs=600)
    assert float(full.nodes["y"]["scale"]) == pytest.approx(plate)


def test_masked_proteins_do_not_reach_the_likelihood(adata):
    data, mb = _batch(adata)
    m = _module(data)
    args = list(mb.args())
    mask = torch.ones(64, data.n_proteins, dtype=torch.bool)
    mask[:, :4] = False
    args[5] = mask
    losses = []
    for scale in (1.0, 7.0):
        args[1] = mb.y.clone()
        args[1][:, :4] *= scale
        pyro.set_rng_seed(0)
        losses.append(Trace_ELBO().loss(m.model, m.guide, *args))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_minibatch_elbo_is_unbiased_for_full_batch(adata):
    data = CiteData(adata)
    m = _module(data)
    n = 128
    full = data.minibatch(np.arange(n))
    elbo = Trace_ELBO()
    pyro.set_rng_seed(0)
    full_draws = [elbo.loss(m.model, m.guide, *full.args()) for _ in range(100)]
    rng = np.random.default_rng(0)
    mini_draws = []
    for _ in range(200):
        mb = data.minibatch(rng.choice(n, 16, replace=False))
        mini_draws.append(elbo.loss(m.model, m.guide, *mb.args(), idx=mb.idx, n_obs=n))
    se = np.sqrt(np.var(full_draws) / 100 + np.var(mini_draws) / 200)
    assert abs(np.mean(full_draws) - np.mean(mini_draws)) < 4 * se
    # without the plate's n_obs / B scaling the estimate would be 8x too small
    assert np.mean(mini_draws) > 4 * np.mean(full_draws) / 8


def test_plain_pyro_svi_on_tensors(adata):
    """README's example: the raw model and guide trained by pyro.infer.SVI."""
    data, mb = _batch(adata, 128)
    m = _module(data).train()
    pyro.clear_param_store()
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(*mb.args()) for _ in range(60)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert "totalvi$$$log_theta" in pyro.get_param_store()


def test_prior_predictive_with_predictive(adata):
    data, mb = _batch(adata, 32)
    m = _module(data)
    pred = pyro.infer.Predictive(m.model, num_samples=3)(None, None, mb.s, mb.log_library)
    assert pred["x"].shape == (3, 32, data.n_genes)
    assert pred["y"].shape == (3, 32, data.n_proteins)
    assert (pred["y"] >= 0).all() and (pred["x"] == pred["x"].round()).all()


def test_readme_plain_pyro_example_runs():
    text = (ROOT / "README.md").read_text()
    start = text.index("### Plain Pyro on tensors")
    code = text[text.index("```python", start) + 9 : text.index("```", text.index("```python",
                                                                                     start) + 9)]
    pyro.clear_param_store()
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert np.isfinite(namespace["loss"])
    assert namespace["loss"] < 1e7
