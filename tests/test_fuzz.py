"""Property-based fuzzing of setup -> model -> train -> latent on small, odd AnnData.

Every input must either work (finite latent of the right shape) or fail with the package's
documented errors: ``TotalVIDataError`` for invalid data, ``KeyError`` for missing keys. Which one
is expected is derived from the generated data, so a wrong error, or an error for valid data, fails.
"""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyro_totalvi import TOTALVI, TotalVIDataError

DTYPES = [np.int32, np.int64, np.float32, np.float64]
BAD = ["negative", "nan", "inf", "non_integer", "zero_cell"]


pytestmark = pytest.mark.usefixtures("one_thread")


def rare(draw, one_in: int) -> bool:
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


@st.composite
def cases(draw):
    # Hypothesis favours boundary values (0); weight them so that most cases can train.
    n_cells = draw(st.sampled_from([1, 2, 3]) if rare(draw, 6) else st.integers(4, 40))
    n_genes = 0 if rare(draw, 12) else draw(st.integers(1, 15))
    n_proteins = 0 if rare(draw, 12) else draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def counts(shape, dtype, density):
        m = rng.poisson(rng.uniform(0.5, 20), shape) * (rng.random(shape) < density)
        return m.astype(dtype)

    x = counts((n_cells, n_genes), draw(st.sampled_from(DTYPES)), draw(st.floats(0.0, 1.0)))
    if not rare(draw, 5) and n_genes:  # mostly no empty cells
        x[np.arange(n_cells), rng.integers(0, n_genes, n_cells)] += 1
    y = counts((n_cells, n_proteins), draw(st.sampled_from(DTYPES)), draw(st.floats(0.0, 1.0)))
    # Occasionally corrupt one matrix (x or y) at a few random entries.
    bad = draw(st.sampled_from(BAD)) if rare(draw, 3) else None
    target = draw(st.sampled_from(["x", "y"]))
    m = x if target == "x" else y
    if bad is not None and m.size:
        if bad in ("nan", "inf", "non_integer") and m.dtype.kind != "f":
            m = m.astype(np.float64)
        where = rng.integers(0, m.size, draw(st.integers(1, 3)))
        flat = m.reshape(-1)
        if bad == "zero_cell":
            m[rng.integers(0, m.shape[0])] = 0
        else:
            flat[where] = {"negative": -1, "nan": np.nan, "inf": np.inf,
                           "non_integer": 0.5}[bad]
        x, y = (m, y) if target == "x" else (x, m)

    obs_names = [f"cell{i}" for i in range(n_cells)]
    adata = ad.AnnData(
        X=sp.csr_matrix(x) if draw(st.booleans()) else x,
        obs=pd.DataFrame(index=obs_names),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )
    if draw(st.booleans()):
        adata.obsm["protein_expression"] = pd.DataFrame(
            y, index=adata.obs_names, columns=[f"p{t}" for t in range(n_proteins)])
    else:
        adata.obsm["protein_expression"] = y
    n_batches = draw(st.sampled_from([None, 1, 2, 3]))
    batch_key = None
    if n_batches is not None:
        labels = np.asarray([f"b{k}" for k in rng.integers(0, n_batches, n_cells)])
        adata.obs["batch"] = (pd.Categorical(labels) if draw(st.booleans()) else labels)
        batch_key = "batch"
    missing = draw(st.sampled_from(["protein_key", "batch_key"])) if rare(draw, 10) else None
    protein_key = "protein_expression"
    if missing == "protein_key":
        protein_key = "no_such_protein_key"
    elif missing == "batch_key":
        batch_key = "no_such_batch_key"
    # Mostly the defaults; sometimes tiny minibatches, tiny training fractions, other variants.
    model_kwargs = {}
    if rare(draw, 4):
        model_kwargs = {"protein_mixture": draw(st.sampled_from(["marginal", "enumerate"])),
                        "use_observed_lib_size": draw(st.booleans()),
                        "empirical_protein_background_prior": draw(st.booleans())}
    train_kwargs = {}
    if rare(draw, 3):
        train_kwargs = {"batch_size": draw(st.sampled_from([2, 3, 4, 7, 256])),
                        "train_size": draw(st.sampled_from([0.01, 0.1, 0.5, 0.9, 1.0]))}
    return adata, x, y, protein_key, batch_key, model_kwargs, train_kwargs


def _expected_errors(x, y, protein_key, batch_key) -> tuple[type, ...]:
    """The documented errors that the input deserves; empty when it must train."""
    errors = []
    if protein_key != "protein_expression" or batch_key == "no_such_batch_key":
        errors.append(KeyError)
    n_cells, n_genes = x.shape
    with np.errstate(invalid="ignore"):
        invalid_values = any(
            m.size and (~np.isfinite(m.astype(np.float64)).all() or (m < 0).any())
            for m in (x, y)
        )
        empty_cells = n_genes and (x.astype(np.float64).sum(1) <= 0).any()
    if (n_genes == 0 or y.shape[1] == 0 or invalid_values or empty_cells or n_cells < 2):
        errors.append(TotalVIDataError)
    return tuple(errors)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_setup_train_latent_succeeds_or_raises_documented_error(case):
    adata, x, y, protein_key, batch_key, model_kwargs, train_kwargs = case
    expected = _expected_errors(x, y, protein_key, batch_key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            TOTALVI.setup_anndata(adata, protein_expression_obsm_key=protein_key,
                                  batch_key=batch_key)
            model = TOTALVI(adata, n_hidden=8, n_latent=2, **model_kwargs)
            model.train(max_epochs=1, progress_bar=False, **train_kwargs)
            latent = model.get_latent_representation()
        except (TotalVIDataError, KeyError) as err:
            assert expected, f"valid input raised {err!r}"
            assert isinstance(err, expected), f"expected {expected}, got {err!r}"
            event(f"raised {type(err).__name__}: {str(err)[:30]}")
            return
    assert not expected, f"expected {expected}, but training succeeded"
    event("trained")
    assert latent.shape == (adata.n_obs, 2)
    assert np.isfinite(latent).all()
    assert np.isfinite(model.history["loss_train"]).all()
    non_integer = any(m.dtype.kind == "f" and (m != np.round(m)).any() for m in (x, y))
    warned = any(issubclass(w.category, UserWarning) and "non-integer" in str(w.message)
                 for w in caught)
    assert warned == non_integer
