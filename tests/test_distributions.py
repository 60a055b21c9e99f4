"""NegativeBinomial and NegativeBinomialMixture against scipy, Monte Carlo and extreme inputs."""

import numpy as np
import pytest
import scipy.stats as st
import torch
from scipy.special import gammaln

from pyro_totalvi.distributions import NegativeBinomial, NegativeBinomialMixture, log_nb


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


# float32 rounds every term to about 6e-8 of its size; the largest terms are lgamma(x + 1),
# x log(mu) and the result itself, so the error allowed is a few roundings of those.
EXTREME_THETA = [1e-2, 1.0, 1e3, 1e5, 1e6, 1e8]


def extreme_grid():
    theta, mu, x = (a.ravel() for a in np.meshgrid(
        EXTREME_THETA, [1e-3, 0.5, 10.0, 1e3], [0.0, 1.0, 5.0, 100.0, 1e3, 1e4], indexing="ij"))
    scale = 1 + gammaln(x + 1) + x * np.abs(np.log(mu))
    return x, mu, theta, scale


def as32(*arrays):
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


def test_nb_accurate_in_float32_at_extreme_theta():
    """Against scipy in float64. The former float32 form was 0.06 nats off per entry at
    theta = 1e5 and 0.8 at 1e6 (differences of log-gammas of about theta log theta)."""
    x, mu, theta, scale = extreme_grid()
    ref = scipy_nb(x, mu, theta)
    got = NegativeBinomial(*as32(mu, theta)).log_prob(torch.tensor(x, dtype=torch.float32))
    err = np.abs(got.double().numpy() - ref)
    assert (err <= 2e-6 * (scale + np.abs(ref))).all(), np.max(err / (scale + np.abs(ref)))
    for t in EXTREME_THETA:  # counts up to 100: a few ten-thousandths of a nat on average
        assert err[(theta == t) & (x <= 100)].mean() < 2e-4, (t, err[theta == t])


def test_mixture_accurate_in_float32_at_extreme_theta():
    x, mu, theta, scale = extreme_grid()
    logits = np.tile([-3.0, 0.0, 2.0], len(x) // 3 + 1)[: len(x)]
    pi = 1 / (1 + np.exp(-logits))
    ref = np.logaddexp(np.log(pi) + scipy_nb(x, mu, theta),
                       np.log1p(-pi) + scipy_nb(x, 5 * mu, theta))
    got = NegativeBinomialMixture(*as32(mu, 5 * mu, theta, logits)).log_prob(
        torch.tensor(x, dtype=torch.float32))
    err = np.abs(got.double().numpy() - ref)
    assert (err <= 2e-6 * (scale + np.abs(ref))).all(), np.max(err / (scale + np.abs(ref)))
    for t in EXTREME_THETA:
        assert err[(theta == t) & (x <= 100)].mean() < 2e-4, (t, err[theta == t])


def test_theta_gradient_matches_finite_differences_across_the_stirling_switch():
    """The hand-written backward of the log-gamma ratio, on both sides of theta = 10."""
    x = torch.tensor([1.0, 3.0, 50.0, 1000.0, 7.0, 2.0, 0.0], dtype=torch.float64)
    theta = torch.tensor([0.5, 9.99, 10.01, 1e3, 1e6, 3.0, 20.0], dtype=torch.float64,
                         requires_grad=True)
    mu = torch.tensor([0.3, 5.0, 40.0, 900.0, 8.0, 1e-4, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: log_nb(x, mu, t), (theta,), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)
    assert torch.autograd.gradcheck(
        lambda t: NegativeBinomialMixture(mu, 3 * mu, t, torch.zeros(7, dtype=torch.float64))
        .log_prob(x), (theta,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layout", ["per_gene", "expanded", "full", "scalar"])
def test_log_nb_same_for_every_theta_layout(layout):
    """Per-gene theta is gathered from the short vector, any other layout element by element:
    the same values and gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(20, 7, generator=g) * 5, generator=g)
    mu = torch.rand(20, 7, generator=g) * 5
    base = torch.rand(7, generator=g) * 30 + 0.1
    if layout == "scalar":
        base = base[:1].squeeze()
    theta = {"per_gene": base, "expanded": base.expand(20, 7),
             "full": base.expand(20, 7).contiguous(), "scalar": base}[layout].detach()
    theta.requires_grad_()
    lp = log_nb(x, mu, theta)
    lp.sum().backward()
    expected = torch.from_numpy(scipy_nb(x.double().numpy(), mu.double().numpy(),
                                         theta.detach().expand(20, 7).double().numpy()))
    np.testing.assert_allclose(lp.detach().double(), expected, rtol=1e-5, atol=1e-5)
    ref_theta = theta.detach().expand(20, 7).double().requires_grad_()
    log_nb(x.double(), mu.double(), ref_theta).sum().backward()
    np.testing.assert_allclose(theta.grad.double(), ref_theta.grad.sum_to_size(theta.shape),
                               rtol=1e-4, atol=1e-4)
