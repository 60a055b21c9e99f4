"""Count distributions of totalVI, in the mean / inverse-dispersion form of the paper.

``NegativeBinomial(mu, theta)`` is Eq. (10) and (14); ``NegativeBinomialMixture`` is Eq. (12)-(14)
with the Bernoulli ``v`` summed out analytically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import Gamma, Poisson, TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

__all__ = ["NegativeBinomial", "NegativeBinomialMixture", "log_nb"]

# Keeps log() finite when a decoder drives a mean to exactly zero (same value as scvi-tools).
_EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    r"""Log density of NB(x; mean ``mu``, inverse dispersion ``theta``), elementwise.

    .. math::
        \log \mathrm{NB}(x;\mu,\theta) = \theta \log\frac{\theta}{\theta+\mu}
        + x \log\frac{\mu}{\theta+\mu} + \log\Gamma(x+\theta) - \log\Gamma(\theta) - \log\Gamma(x+1)

    The three log-gamma terms cancel exactly where ``x == 0``, and single-cell counts are mostly
    zeros, so they are evaluated only at the non-zero entries: lgamma and its gradient, digamma,
    were the most expensive kernels of a training step.
    """
    shape = torch.broadcast_shapes(x.shape, mu.shape, theta.shape)
    log_theta_mu = torch.log(theta + mu + _EPS)
    res = theta * (torch.log(theta + _EPS) - log_theta_mu) + x * (torch.log(mu + _EPS) - log_theta_mu)
    # One nonzero() and flat gathers: boolean-mask indexing would rescan the tensor per operand.
    flat_x = x.expand(shape).reshape(-1)
    nz = flat_x.nonzero().squeeze(-1)
    xn, thn = flat_x[nz], torch.take(theta.expand(shape), nz)
    gamma_terms = torch.lgamma(xn + thn) - torch.lgamma(thn) - torch.lgamma(xn + 1)
    return res.reshape(-1).index_add(0, nz, gamma_terms.to(res.dtype)).view(shape)


def _sample_nb(mu: torch.Tensor, theta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # NB as a Gamma-Poisson compound: rate ~ Gamma(theta, theta / mu), count ~ Poisson(rate).
    with torch.no_grad():
        rate = Gamma(theta, theta / mu.clamp_min(_EPS)).sample(shape)
        return Poisson(rate.clamp_max(1e8)).sample()


class NegativeBinomial(TorchDistribution):
    r"""Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    ``Var[x] = mu + mu**2 / theta``. Equivalent to ``GammaPoisson(theta, theta / mu)``.
    """

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args=None):
        self.mu, self.theta = broadcast_all(mu, theta)
        super().__init__(self.mu.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomial, _instance)
        batch_shape = torch.Size(batch_shape)
        new.mu = self.mu.expand(batch_shape)
        new.theta = self.theta.expand(batch_shape)
        super(NegativeBinomial, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return _sample_nb(self.mu, self.theta, torch.Size(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_nb(value, self.mu, self.theta)


class NegativeBinomialMixture(TorchDistribution):
    r"""Two negative binomials sharing ``theta``: Eq. (12)-(14) with ``v`` integrated out.

    .. math::
        p(y) = \sigma(w)\,\mathrm{NB}(y;\mu_1,\theta) + \sigma(-w)\,\mathrm{NB}(y;\mu_2,\theta)

    Parameters
    ----------
    mu1
        Mean of the first (background) component, ``beta`` in totalVI.
    mu2
        Mean of the second (foreground) component, ``beta * alpha`` in totalVI.
    theta
        Inverse dispersion shared by both components (``phi_t``).
    mixture_logits
        ``w``, the logit of the probability of the *first* component (``logit pi``).
    """

    arg_constraints = {
        "mu1": constraints.nonnegative,
        "mu2": constraints.nonnegative,
        "theta": constraints.positive,
        "mixture_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(self, mu1, mu2, theta, mixture_logits, validate_args=None):
        self.mu1, self.mu2, self.theta, self.mixture_logits = broadcast_all(
            mu1, mu2, theta, mixture_logits
        )
        super().__init__(self.mu1.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomialMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("mu1", "mu2", "theta", "mixture_logits"):
            setattr(new, name, getattr(self, name).expand(batch_shape))
        super(NegativeBinomialMixture, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mixture_probs(self) -> torch.Tensor:
        """Probability of the first (background) component, ``pi``."""
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        pi = self.mixture_probs
        return pi * self.mu1 + (1 - pi) * self.mu2

    @property
    def variance(self) -> torch.Tensor:
        # Law of total variance over the component indicator.
        pi = self.mixture_probs
        second_moment = pi * (self.mu1 + self.mu1**2 * (1 + 1 / self.theta)) + (1 - pi) * (
            self.mu2 + self.mu2**2 * (1 + 1 / self.theta)
        )
        return second_moment - self.mean**2

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            v = torch.bernoulli(self.mixture_probs.expand(shape + self.batch_shape))
            mu = v * self.mu1 + (1 - v) * self.mu2
            return _sample_nb(mu, self.theta.expand(mu.shape), torch.Size())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta, w = self.theta, self.mixture_logits
        # The terms that do not depend on the component are shared: compute them once.
        log_theta_mu1 = torch.log(theta + self.mu1 + _EPS)
        log_theta_mu2 = torch.log(theta + self.mu2 + _EPS)
        log_theta = torch.log(theta + _EPS)
        comp1 = theta * (log_theta - log_theta_mu1) + value * (
            torch.log(self.mu1 + _EPS) - log_theta_mu1
        )
        comp2 = theta * (log_theta - log_theta_mu2) + value * (
            torch.log(self.mu2 + _EPS) - log_theta_mu2
        )
        # log sigmoid(w) = -softplus(-w); log sigmoid(-w) = -softplus(w)
        mix = torch.logaddexp(comp1 - F.softplus(-w), comp2 - F.softplus(w))
        return mix + torch.lgamma(value + theta) - torch.lgamma(theta) - torch.lgamma(value + 1)

    def first_component_probability(self, value: torch.Tensor) -> torch.Tensor:
        r"""Posterior probability that ``value`` came from the first component (Bayes' rule).

        .. math::
            P(v = 1 \mid y) = \frac{\sigma(w)\,\mathrm{NB}(y;\mu_1,\theta)}
            {\sigma(w)\,\mathrm{NB}(y;\mu_1,\theta) + \sigma(-w)\,\mathrm{NB}(y;\mu_2,\theta)}
            = \sigma\bigl(w + \log\mathrm{NB}(y;\mu_1,\theta) - \log\mathrm{NB}(y;\mu_2,\theta)\bigr)

        In totalVI (``mu1 = beta``, ``mu2 = beta * alpha``, ``w = logit pi``) this is the
        *responsibility* of the background for the observed count ``y``: the probability that
        ``v = 1`` given the count, where ``sigmoid(w) = pi`` is the probability before seeing it.
        """
        log_ratio = log_nb(value, self.mu1, self.theta) - log_nb(value, self.mu2, self.theta)
        return torch.sigmoid(self.mixture_logits + log_ratio)
