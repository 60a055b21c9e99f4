"""The one trace scorer: reported likelihoods equal Pyro's ELBO and leave non-model factors out."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_totalvi import TotalVIModule
from pyro_totalvi.data import CiteData
from pyro_totalvi.scoring import elbo_terms, score_minibatch, trace_terms


def _module(data, **kw):
    torch.manual_seed(0)
    return TotalVIModule(data.n_genes, data.n_proteins, data.n_batches, n_latent=6, n_hidden=32,
                         **kw).eval()


@pytest.mark.parametrize("observed", [True, False])
def test_terms_sum_to_pyros_elbo(adata, observed):
    """With the one-draw estimator, the terms summed over cells are -Trace_ELBO's loss (no
    penalty), draw for draw; the analytic KL differs from it only by Monte Carlo noise."""
    data = CiteData(adata)
    m = _module(data, use_observed_lib_size=observed, background_preference=0.0)
    mb = data.minibatch(np.arange(64))
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().loss(m.model, m.guide, *mb.args())
    pyro.set_rng_seed(1)
    guide_tr = poutine.trace(m.guide).get_trace(*mb.args())
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(*mb.args())
    sampled = trace_terms(model_tr, guide_tr, kl="sample")
    assert set(sampled) == ({"z", "x", "background_scale", "beta", "y"}
                            | (set() if observed else {"l"}))
    assert all(v.shape == (64,) for v in sampled.values())
    assert -sum(v.sum() for v in sampled.values()).item() == pytest.approx(loss, rel=1e-5)
    analytic = trace_terms(model_tr, guide_tr, kl="analytic")
    for name in ("x", "y"):  # observed sites are the same either way
        assert torch.equal(analytic[name], sampled[name])
    assert not torch.allclose(analytic["z"], sampled["z"])  # a closed form, not the draw


def test_reported_likelihoods_ignore_the_background_preference(trained):
    """Changing the non-model factor's weight changes training but no reported value."""
    def reported():
        out = []
        for query in (lambda: trained.get_elbo(),
                      lambda: trained.get_reconstruction_error(),
                      lambda: trained.get_marginal_ll(indices=np.arange(50), n_mc_samples=4),
                      lambda: elbo_terms(trained.module, trained.data, np.arange(100))["y"]):
            pyro.set_rng_seed(7)
            out.append(query())
        return out

    module = trained.module
    saved = module.background_preference
    mb = trained.data.minibatch(np.arange(64))
    try:
        before = reported()
        pyro.set_rng_seed(0)
        loss_before = Trace_ELBO().loss(module.model, module.guide, *mb.args())
        module.background_preference = 5.0
        after = reported()
        pyro.set_rng_seed(0)
        loss_after = Trace_ELBO().loss(module.model, module.guide, *mb.args())
    finally:
        module.background_preference = saved
    assert before == after
    assert abs(loss_after - loss_before) > 1.0  # the training objective does see the factor


class _PriorOnTheta(TotalVIModule):
    """A global model term: log theta_g ~ Normal(0, 1) (observed site outside the cell plate)."""

    def model(self, *args, **kwargs):
        pyro.sample("log_theta", dist.Normal(0.0, 1.0).expand([self.n_genes]).to_event(1),
                    obs=self.log_theta)
        return super().model(*args, **kwargs)


def test_a_global_term_is_spread_over_the_cells(adata):
    data = CiteData(adata)
    torch.manual_seed(0)
    m = _PriorOnTheta(data.n_genes, data.n_proteins, data.n_batches, n_latent=4,
                      n_hidden=16).eval()
    m.log_theta = nn.Parameter(torch.linspace(-1, 1, data.n_genes))
    log_prior = dist.Normal(0.0, 1.0).log_prob(m.log_theta).sum().item()
    terms, observed = score_minibatch(m, data.minibatch(np.arange(40)), data.n_obs)
    assert "log_theta" in observed and terms["log_theta"].shape == (40,)
    assert terms["log_theta"][0].item() * data.n_obs == pytest.approx(log_prior, rel=1e-5)
    # per-cell means over any chunking hold the same share: summed over all cells it is whole
    for batch_size in (64, 1000):
        share = elbo_terms(m, data, np.arange(data.n_obs), batch_size)["log_theta"]
        assert -share * data.n_obs == pytest.approx(log_prior, rel=1e-5)
