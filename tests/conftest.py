"""Shared fixtures: small simulated CITE-seq data made once per session."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_totalvi import TOTALVI, simulate

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT / ".." / "shared" / "data"


def benchmark_module(name: str):
    """The script ``benchmarks/<name>.py`` as a module (its functions, without running it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_file(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives in ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks: they gain nothing from threads, and on a busy 2-core
    machine two threads per process spin in OpenMP barriers (tens of times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sim_adata():
    """600 cells x 120 genes x 12 proteins, 2 batches, 4 groups; do not modify (copy first)."""
    return simulate(600, n_genes=120, n_proteins=12, n_batches=2, n_groups=4, seed=1)


@pytest.fixture
def adata(sim_adata):
    a = sim_adata.copy()
    TOTALVI.setup_anndata(a, protein_expression_obsm_key="protein_expression", batch_key="batch")
    return a


@pytest.fixture(scope="session")
def trained(sim_adata):
    """A model trained long enough to separate the simulated groups."""
    a = sim_adata.copy()
    TOTALVI.setup_anndata(a, batch_key="batch")
    model = TOTALVI(a, n_latent=10)
    model.train(max_epochs=60, seed=0, progress_bar=False)
    return model


def knn_accuracy(latent: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy of ``labels`` in ``latent``."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(k), latent, labels, cv=5).mean())
