"""The model extensions of tutorials/03, taken from the notebook itself: each subclass overrides
one block (or wraps ``model``), trains through ``TOTALVI(module_class=...)``, saves and loads."""

import json

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_totalvi import TOTALVI, TotalVIModule
from pyro_totalvi.data import CiteData

from .conftest import ROOT

NOTEBOOK = ROOT / "tutorials" / "03_extending_the_model.ipynb"
MAX_LINES = 20  # a subclass's code cell, blank lines not counted


def _class_cells() -> dict[str, str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return {src.split("class ")[1].split("(")[0]: src for src in sources
            if src.startswith("class ") and "(TotalVIModule)" in src.splitlines()[0]}


@pytest.fixture(scope="module")
def extensions():
    namespace = {}
    exec("import torch\nimport pyro\nimport pyro.distributions as dist\nfrom torch import nn\n"
         "from pyro_totalvi import TotalVIModule", namespace)
    cells = _class_cells()
    for src in cells.values():
        exec(compile(src, str(NOTEBOOK), "exec"), namespace)
    return {name: namespace[name] for name in cells}


def test_tutorial_subclasses_are_short_and_restate_no_base_site():
    cells = _class_cells()
    assert set(cells) == {"ZINBTotalVIModule", "ShrunkDispersionModule"}
    for name, src in cells.items():
        assert len([line for line in src.splitlines() if line.strip()]) <= MAX_LINES, name
        for site in ("z", "l", "x", "beta", "v", "y"):
            assert f'pyro.sample("{site}"' not in src, (name, site)


def test_zinb_overrides_only_the_rna_likelihood(adata, extensions):
    """Same parameters with no dropout: the ZINB's ELBO equals the base model's; dropout moves
    only the RNA term."""
    data = CiteData(adata)
    zinb_cls = extensions["ZINBTotalVIModule"]
    torch.manual_seed(0)
    base = TotalVIModule(data.n_genes, data.n_proteins, data.n_batches, n_latent=4,
                         n_hidden=16).eval()
    zinb = zinb_cls(data.n_genes, data.n_proteins, data.n_batches, n_latent=4,
                    n_hidden=16).eval()
    zinb.load_state_dict({**base.state_dict(), "dropout_raw": torch.full((data.n_genes,), -10.0)})
    mb = data.minibatch(np.arange(50))
    losses = []
    for m in (base, zinb):
        pyro.set_rng_seed(0)
        losses.append(Trace_ELBO().loss(m.model, m.guide, *mb.args()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    x_dist = zinb.rna_likelihood(mb.log_library.exp(), torch.full((50, data.n_genes),
                                                                  1 / data.n_genes))
    assert isinstance(x_dist, pyro.distributions.ZeroInflatedDistribution)


@pytest.mark.parametrize("name", ["ZINBTotalVIModule", "ShrunkDispersionModule"])
def test_extension_trains_saves_and_loads(adata, extensions, tmp_path, name, one_thread):
    cls = extensions[name]
    model = TOTALVI(adata, n_latent=4, n_hidden=32, module_class=cls)
    model.train(max_epochs=3, seed=0, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"]).all()
    extra = set(model.module.state_dict()) - set(TotalVIModule(
        model.data.n_genes, model.data.n_proteins, model.data.n_batches, n_latent=4,
        n_hidden=32).state_dict())
    assert extra  # the extension's own parameters ...
    model.save(tmp_path / "m")
    loaded = TOTALVI.load(tmp_path / "m", adata, module_class=cls)
    for key in extra:  # ... are saved and loaded
        assert torch.equal(loaded.module.state_dict()[key], model.module.state_dict()[key])
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TOTALVI.load(tmp_path / "m", adata)  # the base class lacks the extension's parameters
