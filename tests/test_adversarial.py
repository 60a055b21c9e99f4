"""The adversarial batch classifier: what its two losses touch, its learning, defaults, resume."""

import copy
import logging

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_totalvi import TOTALVI, simulate
from pyro_totalvi.adversarial import AdversarialClassifier, watch_latent
from pyro_totalvi.checkpoint import load_checkpoint
from pyro_totalvi.rng import rng_scope

pytestmark = pytest.mark.usefixtures("one_thread")


def _panels(n=300):
    """Two batches; batch_1 lacks two proteins (all zero there)."""
    a = simulate(n, n_genes=40, n_proteins=6, n_batches=2, seed=0)
    b1 = (a.obs["batch"] == "batch_1").to_numpy()
    a.obsm["protein_expression"].loc[b1, ["protein_1", "protein_2"]] = 0
    TOTALVI.setup_anndata(a, batch_key="batch")
    return a


def _gradients(module, mb, adversary, kl_weight=0.3):
    """Gradients of one step's objective (SVI loss, plus the fool loss with an adversary)."""
    module = copy.deepcopy(module)
    module.train()
    with rng_scope(0):  # the same draws (z, dropout) with and without the adversary
        with watch_latent(adversary, kl_weight) as current:
            loss = Trace_ELBO().differentiable_loss(module.model, module.guide, *mb.args(),
                                                    kl_weight=kl_weight)
        (loss if current is None else loss + current.fool_loss(mb.s)).backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters()
                         if p.grad is not None}


@pytest.mark.slow
def test_fool_loss_reaches_the_encoder_of_z_only(adata):
    """The adversarial term is outside the Pyro program: the SVI loss is the same, and of all
    the model's parameters only q(z)'s encoder gets a different gradient (through z)."""
    m = TOTALVI(adata, n_latent=5, n_hidden=32)
    mb = m.data.minibatch(np.arange(64))
    loss0, plain = _gradients(m.module, mb, None)
    loss1, adv = _gradients(m.module, mb, AdversarialClassifier(5, 2))
    assert loss0 == loss1 and plain.keys() == adv.keys()
    changed = {n for n in plain if not torch.equal(plain[n], adv[n])}
    assert changed and all(n.startswith("encoder.") for n in changed), changed
    assert "encoder.z_loc.weight" in changed


def test_no_adversary_after_the_warmup():
    with watch_latent(AdversarialClassifier(3, 2), kl_weight=1.0) as current:
        assert current is None


def test_fool_loss_targets_the_other_batches():
    """Cross-entropy against a uniform choice among each cell's other batches."""
    adv = AdversarialClassifier(4, 3)
    adv.classifier.eval()
    z, s = torch.randn(8, 4), torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])]
    log_p = torch.log_softmax(adv.classifier(z), -1)
    expected = -(log_p * (1 - s)).sum(-1).mean() / 2
    assert torch.allclose(adv.fool_loss(z, s), expected)


def test_classifier_learns_the_batch_from_z():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 2, (256,), generator=g)
    z = torch.randn(256, 5, generator=g) + 1.5 * batch[:, None]  # batch shifts z
    s = torch.eye(2)[batch]
    adv = AdversarialClassifier(5, 2)
    for _ in range(200):
        adv.classifier_step(z, s, kappa=1.0)
    adv.classifier.eval()
    accuracy = (adv.classifier(z).argmax(-1) == batch).float().mean().item()
    assert accuracy > 0.85, accuracy  # the Bayes classifier gets about 0.77... 0.93 here


def test_scvi_tools_rule_and_our_default(adata, tmp_path):
    assert not TOTALVI(adata, n_latent=4, n_hidden=16).scvi_adversarial_rule()  # all measured
    m = TOTALVI(_panels(), n_latent=4, n_hidden=16)
    assert m.scvi_adversarial_rule()
    m.train(max_epochs=1, progress_bar=False, checkpoint_dir=tmp_path)  # None: off (measured)
    state = load_checkpoint(tmp_path)
    assert state["adversary"] is None and state["settings"]["adversarial_classifier"] is False


def test_one_batch_trains_no_classifier(caplog):
    a = simulate(100, n_genes=20, n_proteins=4, n_batches=1, seed=0)
    TOTALVI.setup_anndata(a)
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        TOTALVI(a, n_latent=4, n_hidden=16).train(max_epochs=1, progress_bar=False,
                                                 adversarial_classifier=True)
    assert any("one batch" in r.getMessage() for r in caplog.records)


def test_resume_with_the_adversary_is_exact(tmp_path):
    """The classifier and its optimiser are checkpointed with the rest."""
    a = _panels()
    kw = dict(seed=3, batch_size=64, progress_bar=False, adversarial_classifier=True)
    whole = TOTALVI(a, n_latent=4, n_hidden=16).train(max_epochs=4, **kw)
    TOTALVI(a, n_latent=4, n_hidden=16).train(max_epochs=2, checkpoint_dir=tmp_path,
                                              checkpoint_every=2, **kw)
    resumed = TOTALVI(a, n_latent=4, n_hidden=16).train(max_epochs=4, checkpoint_dir=tmp_path,
                                                        resume=True, **kw)
    np.testing.assert_array_equal(whole.history.to_numpy(), resumed.history.to_numpy())
    np.testing.assert_array_equal(whole.get_latent_representation(),
                                  resumed.get_latent_representation())
    with pytest.raises(ValueError, match="adversarial_classifier"):
        TOTALVI(a, n_latent=4, n_hidden=16).train(max_epochs=4, checkpoint_dir=tmp_path,
                                                  resume=True, **{**kw,
                                                                  "adversarial_classifier": False})
