"""An adversarial batch classifier on the latent space, as scvi-tools' ``AdversarialTrainingPlan``.

A small network learns to predict each cell's batch from its latent ``z``; the encoder is pushed
to make that prediction fail, which mixes batches in ``z``. scvi-tools trains totalVI with one by
default when some proteins are missing in some batches (see ``TOTALVI.train``). Per minibatch,
with ``kappa = 1 - kl_weight`` (so the adversary fades out with the KL warm-up, as scvi-tools'
``scale_adversarial_loss="auto"``):

1. the SVI loss, plus ``kappa`` times the *fool* loss: the cross-entropy of the classifier's
   prediction for ``z`` (the guide's draw) against a uniform choice among the cell's *other*
   batches. Its gradient reaches the encoder through ``z``; the module's optimiser steps on it.
2. the classifier's own step, with its own Adam (``lr=1e-3``, ``eps=0.01``): ``kappa`` times the
   cross-entropy against the true batch, on ``z`` detached, so only the classifier learns from it.

Why two optimiser steps outside the Pyro program rather than a ``pyro.factor``: the two players
want opposite things from the same cross-entropy, a minimax that one objective cannot express (a
factor's gradient would also train the classifier to be fooled), and the fool term is not part
of the generative model, so it must not enter any reported likelihood. Here it never enters the
Pyro program at all: the scorer (:mod:`pyro_totalvi.scoring`) and every ELBO stay as they are,
and :class:`LatentRecorder` only *reads* the ``z`` site while ``Trace_ELBO`` runs the guide.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pyro.poutine.messenger import Messenger
from torch import nn

from .nn import FCLayers

__all__ = ["BatchClassifier", "AdversarialClassifier", "LatentRecorder", "watch_latent"]


class BatchClassifier(nn.Module):
    """Batch logits from ``z``: scvi-tools' ``Classifier(n_hidden=32, n_layers=2, logits=True)``
    (two Linear-BatchNorm-ReLU-Dropout(0.1) blocks of 32 units, then a linear layer)."""

    def __init__(self, n_latent: int, n_batches: int, n_hidden: int = 32, n_layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.hidden = FCLayers(n_latent, n_hidden, n_layers=n_layers, n_hidden=n_hidden,
                               dropout=dropout)
        self.out = nn.Linear(n_hidden, n_batches)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(z))


class LatentRecorder(Messenger):
    """Records the value of the sample site ``name`` the first time it is sampled: under
    ``Trace_ELBO`` the guide runs first and the model replays its draw, so this is the guide's
    reparameterised ``z`` (gradients flow back to the encoder)."""

    def __init__(self, name: str = "z"):
        super().__init__()
        self.name = name
        self.value: torch.Tensor | None = None

    def _postprocess_message(self, msg) -> None:
        if self.value is None and msg["type"] == "sample" and msg["name"] == self.name:
            value = msg["value"]
            self.value = value.reshape(-1, value.shape[-1])  # (B, 1, d) -> (B, d)


class AdversarialClassifier:
    """The classifier, its optimiser and the two losses (see the module docstring)."""

    def __init__(self, n_latent: int, n_batches: int, weight_decay: float = 1e-6,
                 device: torch.device | str = "cpu"):
        from .train import make_adam  # train imports this module

        if n_batches < 2:
            raise ValueError("an adversarial batch classifier needs at least 2 batches")
        self.n_batches = n_batches
        self.classifier = BatchClassifier(n_latent, n_batches).to(device)
        self.params = [p for p in self.classifier.parameters() if p.requires_grad]
        self.optimizer = make_adam(self.params, lr=1e-3, eps=0.01, weight_decay=weight_decay)

    def fool_loss(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the prediction for ``z`` against a uniform choice among each
        cell's other batches (``s`` one-hot): small when the classifier cannot name the batch."""
        log_p = F.log_softmax(self.classifier(z), dim=-1)
        target = (1.0 - s) / (self.n_batches - 1)
        return -(log_p * target).sum(-1).mean()

    def classifier_step(self, z: torch.Tensor, s: torch.Tensor, kappa: float,
                        world: int = 1) -> None:
        """One Adam step of the classifier on ``kappa`` x the cross-entropy of the true batch."""
        loss = kappa * F.cross_entropy(self.classifier(z.detach()), s.argmax(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            from . import distributed as ddp

            ddp.all_reduce_gradients(self.params, loss)  # identical classifiers everywhere
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"classifier": self.classifier.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])


class _Round:
    """One minibatch's use of the adversary: ``z`` as recorded, ``kappa = 1 - kl_weight``."""

    def __init__(self, adversary: AdversarialClassifier, kappa: float):
        self.adversary, self.kappa, self.recorder = adversary, kappa, LatentRecorder("z")

    def fool_loss(self, s: torch.Tensor) -> torch.Tensor:
        return self.kappa * self.adversary.fool_loss(self.recorder.value, s)

    def classifier_step(self, s: torch.Tensor, world: int = 1) -> None:
        self.adversary.classifier_step(self.recorder.value, s, self.kappa, world)


@contextlib.contextmanager
def watch_latent(adversary: AdversarialClassifier | None, kl_weight: float):
    """Around the SVI loss: yields a round that knows the guide's ``z``, or ``None`` when there
    is no adversary or its weight ``1 - kl_weight`` is 0 (after the warm-up: nothing to do)."""
    if adversary is None or kl_weight >= 1.0:
        yield None
        return
    adversary.classifier.train()
    current = _Round(adversary, 1.0 - kl_weight)
    with current.recorder:
        yield current
