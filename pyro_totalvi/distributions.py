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

__all__ = ["NegativeBinomial", "NegativeBinomialMixture", "log_nb", "with_nonzero"]

# Keeps log() finite when a decoder drives a mean to exactly zero (same value as scvi-tools).
_EPS = 1e-8

#: From this inverse dispersion on, ``lgamma(x + theta) - lgamma(theta)`` comes from Stirling's
#: series: in float32 the two log-gammas are each about ``theta log(theta)`` large and their
#: difference loses all digits (lgamma(1e6) = 1.28e7, whose float32 spacing is 1). The series
#: with two terms is within 1e-8 of the truth from here on (next term ``1 / (1260 z**5)``).
_STIRLING_THETA = 10.0


def with_nonzero(x: torch.Tensor, flat_nonzero: torch.Tensor) -> torch.Tensor:
    """Record on ``x`` the flat positions of its nonzero entries, so that :func:`log_nb` needs no
    scan for them; returns ``x``.

    Minibatches cut from a sparse matrix know these positions for free (the CSR indices); a
    ``nonzero()`` scan of a dense 256 x 2,000 minibatch cost as much as the rest of the NB
    likelihood.
    """
    x._flat_nonzero = flat_nonzero
    return x


def _flat_nonzero(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    known = getattr(x, "_flat_nonzero", None)
    if known is not None and x.shape == shape:
        return known
    return x.expand(shape).reshape(-1).nonzero().squeeze(-1)


class _LogGammaRatio(torch.autograd.Function):
    r"""``lgamma(x + theta) - lgamma(theta) - x log(theta)`` and its gradient in ``theta``.

    From ``theta = 10`` on, with Stirling's remainder :math:`S(z) = 1/(12z) - 1/(360z^3)`, it is
    :math:`(\theta - \tfrac12 + x)\,\mathrm{log1p}(x/\theta) - x + S(\theta + x) - S(\theta)`: no
    difference of large numbers, so float32 keeps its accuracy at any ``theta`` (the Poisson
    limit included). Below, the log-gammas as they are. One Function with a hand-written
    backward rather than autograd through both branches: these log-gammas and their gradients
    (digamma) were the most expensive kernels of a training step. ``per_theta`` holds the
    ``theta``-only inputs (:func:`_per_theta`), computed once per gene and gathered.
    """

    @staticmethod
    def forward(x, theta, per_theta):
        big, inv_big, lgamma_t, log_t, s_t = per_theta[:5]
        z = big + x
        r = z.reciprocal()
        stirling = torch.log1p(x * inv_big).mul_(z - 0.5).sub_(x)
        stirling += r * (1.0 / 12 - r * r * (1.0 / 360))
        stirling -= s_t
        exact = torch.lgamma(x + theta).sub_(lgamma_t).sub_(x * log_t)
        return torch.where(theta < _STIRLING_THETA, exact, stirling)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, theta, per_theta = ctx.saved_tensors
        big, inv_big, _, _, _, digamma_t, ds_t, inv_t = per_theta
        z = big + x
        r2 = z.reciprocal().square_()
        x_big = x * inv_big
        # d/dtheta: log1p(x/theta) - (x/theta)(theta - 1/2 + x)/(theta + x) + S'(theta + x) - S'(theta)
        stirling = torch.log1p(x_big).sub_(x_big.mul_(0.5 - z).mul_(r2.sqrt()).neg_())
        stirling += r2 * (r2 * (1.0 / 120) - 1.0 / 12)
        stirling -= ds_t
        exact = torch.digamma(x + theta).sub_(digamma_t).sub_(x * inv_t)
        return None, grad * torch.where(theta < _STIRLING_THETA, exact, stirling), None


def _per_theta(theta: torch.Tensor) -> torch.Tensor:
    """The ``theta``-only inputs of :class:`_LogGammaRatio`, stacked in the first dimension:
    ``max(theta, 10)``, its inverse, ``lgamma``, ``log``, ``S``, ``digamma``, ``S'`` and ``1 /
    theta`` (no gradient: the backward uses ``digamma`` and ``S'``)."""
    with torch.no_grad():
        big = theta.clamp_min(_STIRLING_THETA)  # the branch torch.where leaves out stays finite
        r = big.reciprocal()
        s = r * (1.0 / 12 - r * r * (1.0 / 360))
        ds = -r * r * (1.0 / 12 - r * r * (1.0 / 120))
        return torch.stack([big, r, torch.lgamma(theta), torch.log(theta), s,
                            torch.digamma(theta), ds, theta.reciprocal()])


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the dimensions an ``expand`` broadcast (stride 0; kept as size 1): what is
    computed from a per-gene ``theta`` that ``broadcast_all`` expanded to cells x genes is
    then computed once per gene. An expanded leaf that requires a gradient is left as it is
    (its gradient is per element)."""
    if t.is_leaf and t.requires_grad:
        return t
    return t[tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                   for stride, size in zip(t.stride(), t.shape))]


def _gamma_terms(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) - x log(theta)``, elementwise (zero
    where ``x == 0``)."""
    return _LogGammaRatio.apply(x, theta, _per_theta(theta)) - torch.lgamma(x + 1)


def _sparse_gamma_terms(x: torch.Tensor, theta: torch.Tensor, shape: torch.Size):
    """:func:`_gamma_terms` where ``x != 0`` only, as ``(flat indices into shape, values)``:
    single-cell RNA counts are mostly zeros. The positions come from :func:`with_nonzero`'s
    record, else from a scan."""
    nz = _flat_nonzero(x, shape)
    xn = torch.take(x.expand(shape), nz)
    per_theta = _per_theta(theta)
    if theta.numel() == 1 or theta.shape[-1:] == shape[-1:] == (theta.numel(),):
        # one theta per gene (or one for all): the per-gene values in one gather. index_select,
        # not [feature]: its gradient is an index_add, the indexing's an accumulating index_put,
        # on CPU 0.1 against 0.3-1.6 ms for 60,000 counts into 2,000 genes
        feature = nz % shape[-1]
        thn = theta.reshape(-1).expand(shape[-1]).index_select(0, feature)
        per_n = per_theta.reshape(len(per_theta), -1).expand(-1, shape[-1]).index_select(
            1, feature)
    else:
        thn = torch.take(theta.expand(shape), nz)
        per_n = torch.stack([torch.take(t.expand(shape), nz) for t in per_theta])
    values = _LogGammaRatio.apply(xn, thn, per_n) - torch.lgamma(xn + 1)
    return nz, values


def _count_terms(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``theta log(theta / (theta + mu)) + x log(mu / (theta + mu)) + x log(theta)`` (the last
    term is taken back by :func:`_gamma_terms`), with ``-theta log1p(mu / theta)`` for the first:
    as a difference of two logs it is 0.8 nats off at ``theta = 1e6`` in float32."""
    log_ratio = torch.log1p(mu / (theta + _EPS))
    return x * (torch.log(mu + _EPS) - log_ratio) - theta * log_ratio


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    r"""Log density of NB(x; mean ``mu``, inverse dispersion ``theta``), elementwise.

    .. math::
        \log \mathrm{NB}(x;\mu,\theta) = \theta \log\frac{\theta}{\theta+\mu}
        + x \log\frac{\mu}{\theta+\mu} + \log\Gamma(x+\theta) - \log\Gamma(\theta) - \log\Gamma(x+1)

    Written so that float32 stays accurate at any ``theta`` (:func:`_count_terms`,
    :class:`_LogGammaRatio`): within about 1e-6 of the largest term's size, against scipy in
    float64, from ``theta = 1e-2`` to ``1e8`` (tests/test_distributions.py). The log-gamma
    terms are evaluated only where ``x != 0`` (:func:`_sparse_gamma_terms`; positions recorded by
    :func:`with_nonzero`, else a scan), with the per-gene parts taken once per gene: lgamma and
    its gradient were the most expensive kernels of a training step.
    """
    shape = torch.broadcast_shapes(x.shape, mu.shape, theta.shape)
    theta = _compact(theta)
    res = _count_terms(x, mu, theta).expand(shape).reshape(-1)
    nz, values = _sparse_gamma_terms(x, theta, shape)
    return res.index_add(0, nz, values.to(res.dtype)).view(shape)


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
        # theta as given (e.g. one value per gene): log_nb works per gene with it
        self._theta_arg = theta if torch.is_tensor(theta) else None
        self.mu, self.theta = broadcast_all(mu, theta)
        super().__init__(self.mu.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomial, _instance)
        batch_shape = torch.Size(batch_shape)
        new.mu = self.mu.expand(batch_shape)
        new.theta = self.theta.expand(batch_shape)
        new._theta_arg = self._theta_arg
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
        theta = self.theta if self._theta_arg is None else self._theta_arg
        return log_nb(value, self.mu, theta)


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
        theta, w = _compact(self.theta), self.mixture_logits
        # The stable forms of log_nb; the log-gamma terms do not depend on the component. Dense:
        # protein counts are rarely zero, and a minibatch has few of them.
        comp1 = _count_terms(value, self.mu1, theta)
        comp2 = _count_terms(value, self.mu2, theta)
        # log sigmoid(w) = -softplus(-w); log sigmoid(-w) = -softplus(w)
        mix = torch.logaddexp(comp1 - F.softplus(-w), comp2 - F.softplus(w))
        return mix + _gamma_terms(value, theta)

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
        # the log-gamma terms are the same for both components and cancel
        theta = _compact(self.theta)
        log_ratio = _count_terms(value, self.mu1, theta) - _count_terms(value, self.mu2, theta)
        return torch.sigmoid(self.mixture_logits + log_ratio)
