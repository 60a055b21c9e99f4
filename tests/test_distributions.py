"""NegativeBinomial and NegativeBinomialMixture against scipy, Monte Carlo and extreme inputs."""

import numpy as np
import pytest
import scipy.stats as st
import torch

from pyro_totalvi.distributions import NegativeBinomial, NegativeBinomialMixture


def scipy_nb(x, mu, theta):
    return st.nbinom.logpmf(x, theta, theta / (theta + mu))


@pytest.fixture
def params():
    g = torch.Generator().manual_seed(0)
    mu1 = torch.rand(50, 4, generator=g) * 20 + 0.01
    mu2 = mu1 * (1 + torch.rand(50, 4, generator=g) * 10)
    theta = torch.rand(4, generator=g) * 10 + 0.1
    logits = torch.randn(50, 4, generator=g) * 2
    x = torch.poisson(mu2, generator=g)
    x[::3] = 0
    return x, mu1, mu2, theta, logits


def test_nb_matches_scipy(params):
    x, mu, _, theta, _ = params
    lp = NegativeBinomial(mu, theta, validate_args=True).log_prob(x).double().numpy()
    np.testing.assert_allclose(lp, scipy_nb(x.numpy(), mu.numpy(), theta.numpy()), rtol=1e-4,
                               atol=1e-4)


def test_mixture_matches_scipy(params):
    x, mu1, mu2, theta, logits = params
    d = NegativeBinomialMixture(mu1, mu2, theta, logits, validate_args=True)
    pi = torch.sigmoid(logits).double().numpy()
    ref = np.log(pi * np.exp(scipy_nb(x.numpy(), mu1.numpy(), theta.numpy()))
                 + (1 - pi) * np.exp(scipy_nb(x.numpy(), mu2.numpy(), theta.numpy())))
    np.testing.assert_allclose(d.log_prob(x).double().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_mixture_logits_weight_the_first_component():
    # A very large logit puts all mass on the first (background) component.
    x = torch.arange(20.0)
    d = NegativeBinomialMixture(torch.tensor(2.0), torch.tensor(50.0), torch.tensor(3.0),
                                torch.tensor(30.0))
    np.testing.assert_allclose(d.log_prob(x).numpy(),
                               NegativeBinomial(torch.tensor(2.0), torch.tensor(3.0)).log_prob(x),
                               rtol=1e-5, atol=1e-5)


def test_pmf_sums_to_one():
    x = torch.arange(0.0, 3000.0)
    d = NegativeBinomialMixture(torch.tensor(5.0), torch.tensor(80.0), torch.tensor(2.0),
                                torch.tensor(0.3))
    assert abs(d.log_prob(x).double().exp().sum().item() - 1) < 1e-4


@pytest.mark.parametrize("kind", ["nb", "mixture"])
def test_monte_carlo_moments(kind):
    torch.manual_seed(0)
    mu1, mu2 = torch.tensor([0.5, 5.0, 40.0]), torch.tensor([3.0, 60.0, 400.0])
    theta, logits = torch.tensor([0.7, 4.0, 20.0]), torch.tensor([-1.0, 0.0, 2.0])
    d = NegativeBinomial(mu1, theta) if kind == "nb" else NegativeBinomialMixture(mu1, mu2, theta,
                                                                                  logits)
    s = d.sample((200_000,))
    assert s.shape == (200_000, 3)
    assert (s == s.round()).all() and (s >= 0).all()
    se_mean = (d.variance / 200_000).sqrt()
    assert ((s.mean(0) - d.mean).abs() < 5 * se_mean).all()
    np.testing.assert_allclose(s.var(0).numpy(), d.variance.numpy(), rtol=0.05)


def test_gradients_finite_at_zero_counts_and_extremes():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 1e4, 0.0])
    mu1 = torch.tensor([1e-10, 1e-3, 1e6, 1e-10, 1.0, 5.0], requires_grad=True)
    mu2 = torch.tensor([1e-8, 1e3, 1e7, 1e4, 1e4, 5.0], requires_grad=True)
    theta = torch.tensor([1e-4, 1e6, 1.0, 1e-3, 1e5, 1e-6], requires_grad=True)
    logits = torch.tensor([50.0, -50.0, 0.0, 30.0, -30.0, 0.0], requires_grad=True)
    for d in (NegativeBinomial(mu1, theta), NegativeBinomialMixture(mu1, mu2, theta, logits)):
        lp = d.log_prob(x)
        assert torch.isfinite(lp).all()
        lp.sum().backward()
    for p in (mu1, mu2, theta, logits):
        assert torch.isfinite(p.grad).all()


def test_broadcast_expand_and_support():
    d = NegativeBinomialMixture(torch.ones(3, 1), torch.full((4,), 5.0), torch.tensor(2.0), 0.0)
    assert d.batch_shape == (3, 4)
    e = d.expand((2, 3, 4))
    assert e.batch_shape == (2, 3, 4) and e.sample().shape == (2, 3, 4)
    assert e.log_prob(torch.zeros(2, 3, 4)).shape == (2, 3, 4)
    assert NegativeBinomial(torch.ones(3), 1.0).expand((5, 3)).sample((2,)).shape == (2, 5, 3)
    with pytest.raises(ValueError):
        NegativeBinomial(torch.ones(3), 1.0, validate_args=True).log_prob(torch.tensor([0.5, 1, 2]))
    with pytest.raises(ValueError):
        NegativeBinomial(torch.tensor([-1.0]), torch.tensor([1.0]), validate_args=True)
