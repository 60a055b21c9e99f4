"""Posterior queries of a trained totalVI: draws of the guide, and the model replayed on them.

Draws are vectorised as ``pyro.infer.Predictive(model, guide=guide, parallel=True)`` does (a plate
over draws outside the model's plates), without Predictive's extra passes; see
:meth:`PosteriorMixin._traces`.

Every function works through the cells in chunks and keeps running sums over posterior samples, so
memory is O(chunk x features) whatever ``n_samples`` is; only functions documented to return all
samples (``return_mean=False``, ``posterior_predictive_sample``) hold more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData
from pyro import poutine
from tqdm import tqdm

from .data import CiteData, Minibatch, TotalVIDataError
from .scoring import cell_terms, score_minibatch

__all__ = ["PosteriorMixin"]

_CHUNK = 512
#: Name under which :meth:`PosteriorMixin._draws` gives the posterior probability of background
#: given the observed protein count, P(v = 1 | y, z, beta, alpha, pi).
PI_GIVEN_Y = "pi_given_y"
# cell-draws per vectorised call: 4,096 x 2,000 genes x 4 B = 33 MB per tensor
_ROWS = 4096


class PosteriorMixin:
    """Methods of :class:`~pyro_totalvi.TOTALVI` that query the posterior (scvi-tools' names)."""

    # -- plumbing ------------------------------------------------------------------------------
    def _chunks(
        self, data: CiteData, idx: np.ndarray, batch_size: int | None
    ) -> Iterator[tuple[np.ndarray, Minibatch]]:
        """Yield ``(positions, minibatch)``: rows of the minibatch go to ``out[positions]``.

        ``CiteData.minibatch`` sorts the cells it is given; ``positions`` undo that, so results
        follow the order of ``indices``. Minibatches are on the model's device.
        """
        size = batch_size or _CHUNK
        device = self.device
        for start in range(0, len(idx), size):
            chunk = idx[start : start + size]
            yield start + np.argsort(chunk, kind="stable"), data.minibatch(chunk, device)

    def _batch_codes(self, transform_batch) -> list[int | None]:
        """``transform_batch`` (None, a category or a list) as batch codes; None = own batch."""
        if transform_batch is None:
            return [None]
        cats = list(self.registry["batch_categories"])
        items = transform_batch if isinstance(transform_batch, (list, tuple)) else [transform_batch]
        codes = []
        for item in items:
            if str(item) not in cats:
                raise TotalVIDataError(
                    f"transform_batch {item!r} is not a batch seen at training time; "
                    f"known batches: {cats}"
                )
            codes.append(cats.index(str(item)))
        return codes

    def _one_hot(self, code: int | None, n: int) -> torch.Tensor | None:
        if code is None:
            return None
        return torch.nn.functional.one_hot(torch.full((n,), code, device=self.device),
                                           self.module.n_batches).float()

    def _traces(self, mb: Minibatch, k: int, decode_as: torch.Tensor | None = None,
                observed: bool = True):
        """``k`` posterior draws at once: the guide's trace (z, l, beta ~ q) and the model's trace
        replayed on it (with ``rho``, ``alpha``, ``pi`` as deterministic sites).

        The draws are a plate at ``dim=-3``, outside the model's cell and feature plates, so each
        site gets a leading dimension of size ``k``. This is what ``Predictive(parallel=True)``
        does, without the two extra passes of model and guide it makes to find the plates and
        the shapes (a third of the time of a one-draw-per-cell query such as DE). With
        ``observed=False`` the model samples ``x`` and ``y`` too (posterior predictive).
        """
        args, kwargs = list(mb.args()), dict(mb.kwargs(), decode_as=decode_as)
        # v summed out: the protein likelihood is the mixture, whose components give the
        # foreground probability given the count (:meth:`_pi_given_y`)
        with self.module.v_summed_out(), pyro.plate("_draws", k, dim=-3):
            guide_tr = poutine.trace(self.module.guide).get_trace(*args, **kwargs)
            if not observed:
                args[0] = args[1] = None
            model_tr = poutine.trace(poutine.replay(self.module.model, trace=guide_tr)
                                     ).get_trace(*args, **kwargs)
        return guide_tr, model_tr

    def _draws(self, mb: Minibatch, n_samples: int, code: int | None, sites: Sequence[str]):
        """``n_samples`` posterior draws of ``sites`` for one minibatch, yielded one at a time.

        The guide draws ``z``, ``l``, ``beta`` (and any other latent site) from q, and the model,
        replayed on those draws with the observed counts, gives its sample and deterministic
        sites (``rho``, ``alpha``, ``pi``, ...) and :data:`PI_GIVEN_Y`, the posterior
        probability of background given the observed protein count (see
        :meth:`_pi_given_y`). Draws are vectorised (:meth:`_traces`: the encoder runs once per
        group of draws) in groups of about ``_ROWS`` cell-draws, which bounds memory at
        O(_ROWS x features).
        """
        decode_as = self._one_hot(code, len(mb.idx))
        per_call = max(1, min(n_samples, _ROWS // max(len(mb.idx), 1)))
        done = 0
        while done < n_samples:
            k = min(per_call, n_samples - done)
            _, trace = self._traces(mb, k, decode_as)
            draw = {name: self._pi_given_y(trace, mb) if name == PI_GIVEN_Y
                    else trace.nodes[name]["value"] for name in sites}
            for i in range(k):
                yield {name: value[i] for name, value in draw.items()}
            done += k

    @staticmethod
    def _pi_given_y(trace, mb: Minibatch) -> torch.Tensor:
        r"""Responsibility :math:`P(v_{nt} = 1 \mid y_{nt}, z_n, \beta_{nt})` ``(k, B, T)``.

        Bayes' rule on the two mixture components of the protein likelihood (see
        :meth:`~pyro_totalvi.NegativeBinomialMixture.first_component_probability`); where a
        protein was not measured there is no count to condition on, and the prior ``pi`` is
        returned.
        """
        site = trace.nodes["y"]
        fn = site["fn"]
        if not hasattr(fn, "first_component_probability"):
            raise TypeError(
                f"the protein likelihood {type(fn).__name__} has no first_component_probability("
                "y); use given_counts=False (the prior weight pi) with this module")
        resp = fn.first_component_probability(mb.y)
        if mb.protein_mask is not None:
            resp = torch.where(mb.protein_mask, resp, trace.nodes["pi"]["value"])
        return resp

    def _average_draws(self, data: CiteData, idx: np.ndarray, batch_size: int | None,
                       codes: list[int | None], n_samples: int, sites: Sequence[str],
                       quantity, widths: Sequence[int], return_mean: bool = True,
                       progress_bar: bool = False, desc: str | None = None) -> list[np.ndarray]:
        """Per cell, the average of ``quantity(mb, draw)`` over posterior draws and batch codes.

        ``quantity`` returns one tensor per entry of ``widths`` (cells x width). Sums run per
        cell chunk, so memory is O(chunk x width); ``return_mean=False`` keeps each draw (still
        averaged over ``codes``), giving arrays of shape ``(n_samples, cells, width)``.
        """
        lead = () if return_mean else (n_samples,)
        outs = [np.zeros(lead + (len(idx), w), dtype=np.float32) for w in widths]
        n_avg = len(codes) * (n_samples if return_mean else 1)
        # Few enough cells per chunk that all draws fit one vectorised call: each call has a
        # fixed cost, and n_samples=25 ran 29 % faster with 163 cells per chunk than with 512.
        size = batch_size or int(np.clip(_ROWS // max(n_samples, 1), 64, _CHUNK))
        chunks = tqdm(self._chunks(data, idx, size), total=-(-len(idx) // size),
                      disable=not progress_bar, desc=desc)
        with self.module.fast_calls():
            for pos, mb in chunks:
                accs = [torch.zeros(lead + (len(pos), w), device=self.device) for w in widths]
                for code in codes:
                    for k, d in enumerate(self._draws(mb, n_samples, code, sites)):
                        for acc, value in zip(accs, quantity(mb, d)):
                            if return_mean:
                                acc += value
                            else:
                                acc[k] += value
                for out, acc in zip(outs, accs):
                    out[..., pos, :] = (acc / n_avg).cpu().numpy()
        return outs

    def _select(self, names: Sequence[str], wanted, what: str) -> np.ndarray:
        if wanted is None:
            return np.arange(len(names))
        lookup = {n: i for i, n in enumerate(names)}
        missing = [w for w in wanted if w not in lookup]
        if missing:
            raise KeyError(f"{what} not in the model: {missing[:5]}")
        return np.array([lookup[w] for w in wanted], dtype=np.int64)

    def _prepare(self, adata, indices):
        self.module.eval()
        data = self._data(adata)
        return data, self._indices(data, indices)

    # -- latent quantities ---------------------------------------------------------------------
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior mean (or one sample) of z per cell, ``(n_cells, n_latent)``.

        Store it the scanpy way: ``adata.obsm["X_totalvi"] = model.get_latent_representation()``.
        ``give_mean=False``: one draw from q(z | x, y, s) per cell. ``return_dist=True``: the
        mean and the variance of q, two arrays (as scvi-tools). ``mc_samples`` is accepted for
        scvi-tools compatibility; q is Gaussian, so its mean needs no Monte Carlo estimate.
        """
        data, idx = self._prepare(adata, indices)
        loc = np.zeros((len(idx), self.module.n_latent), dtype=np.float32)
        var = np.zeros_like(loc) if return_dist else None
        for pos, mb in self._chunks(data, idx, batch_size):
            # encode() masks unmeasured proteins and adds the covariates the encoder expects
            z_loc, z_scale, _, _ = self.module.encode(*mb.args())
            if return_dist:
                loc[pos], var[pos] = z_loc.cpu().numpy(), z_scale.square().cpu().numpy()
                continue
            z = z_loc if give_mean else torch.distributions.Normal(z_loc, z_scale).sample()
            loc[pos] = z.cpu().numpy()
        return (loc, var) if return_dist else loc

    @torch.no_grad()
    def get_latent_library_size(
        self, adata: AnnData | None = None, indices=None, give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Library size ``l`` per cell, ``(n_cells, 1)``: observed totals, or E_q[l] (or a draw)."""
        data, idx = self._prepare(adata, indices)
        out = np.zeros((len(idx), 1), dtype=np.float32)
        for pos, mb in self._chunks(data, idx, batch_size):
            if self.module.use_observed_lib_size:
                out[pos] = mb.log_library.exp().cpu().numpy()
                continue
            _, _, loc, scale = self.module.encode(*mb.args())
            q = torch.distributions.LogNormal(loc, scale)
            out[pos] = (q.mean if give_mean else q.sample()).cpu().numpy()
        return out

    @torch.no_grad()
    def get_protein_background_mean(
        self, adata: AnnData | None = None, indices=None, n_samples: int = 1,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """E_q[beta] per cell and protein, ``(n_cells, n_proteins)`` (averaged over z draws)."""
        data, idx = self._prepare(adata, indices)
        out = np.zeros((len(idx), self.module.n_proteins), dtype=np.float32)
        for pos, mb in self._chunks(data, idx, batch_size):
            acc = 0.0
            with self.module.fast_calls():
                for _ in range(n_samples):
                    guide = poutine.trace(self.module.guide).get_trace(*mb.args(),
                                                                        **mb.kwargs())
                    acc = acc + guide.nodes["beta"]["fn"].mean
            out[pos] = (acc / n_samples).cpu().numpy()
        return out

    # -- denoised expression -------------------------------------------------------------------
    def _denoised(self, library_size="latent", sample_protein_mixing: bool = False,
                  include_protein_background: bool = False, scale_protein: bool = False,
                  weight: str = "pi"):
        """``quantity(mb, draw)`` for :meth:`_average_draws`: ``(l' rho, protein)`` of one draw
        (see :meth:`get_normalized_expression` for the options). ``weight`` is the draw's site
        holding the background weight: ``"pi"`` (prior) or :data:`PI_GIVEN_Y` (given the
        counts)."""
        def denoised(mb, d):
            if library_size == "latent":
                lib = d["l"] if "l" in d else mb.log_library.exp()
            else:
                lib = float(library_size)
            pi = torch.bernoulli(d[weight]) if sample_protein_mixing else d[weight]
            pro = (1 - pi) * d["beta"] * d["alpha"]
            if include_protein_background:
                pro = pro + pi * d["beta"]
            if scale_protein:
                pro = pro / pro.sum(-1, keepdim=True)
            return lib * d["rho"], pro

        return denoised

    def _sample_cells(self, idx: np.ndarray, n: int | None) -> np.ndarray:
        """``n`` cells drawn from ``idx`` with replacement (all of ``idx`` when ``n`` is None),
        from a generator seeded by torch's, so ``torch.manual_seed`` fixes the choice."""
        if n is None:
            return idx
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return rng.choice(idx, int(n), replace=True)

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples_overall: int | None = None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        sample_protein_mixing: bool = False,
        scale_protein: bool = False,
        include_protein_background: bool = False,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        progress_bar: bool = False,
        given_counts: bool | None = None,
    ):
        r"""Denoised RNA and protein expression, Monte Carlo averaged over q (scvi-tools'
        arguments, in its order).

        RNA: :math:`E_q[l' \rho_n]` with :math:`l'` = ``library_size`` (``"latent"``: the cell's
        own library). Protein: :math:`E_q[(1 - w_{nt}) \beta_{nt} \alpha_{nt}]`, plus
        :math:`w_{nt}\beta_{nt}` with ``include_protein_background``, where the background
        weight :math:`w_{nt}` is the posterior probability of background given the observed
        count, :math:`P(v_{nt} = 1 \mid y_{nt}, z_n, \beta_{nt})` (``given_counts``, see
        :meth:`get_protein_foreground_probability`), or the prior weight :math:`\pi_{nt}`
        (``given_counts=False``, scvi-tools' choice; the default with ``transform_batch``). With
        ``sample_protein_mixing`` a draw :math:`v_{nt} \sim \mathrm{Bernoulli}(w_{nt})` replaces
        :math:`w_{nt}`; ``scale_protein`` divides by the per-cell protein total.

        Parameters
        ----------
        n_samples_overall
            Draw this many cells (with replacement) from ``indices`` and return one row per
            draw (rows repeat cells), as scvi-tools; ``None``: every cell once.
        transform_batch
            A batch category, or a list of them (averaged): the generative networks decode every
            cell as if it came from that batch (counterfactual expression). ``None``: own batch.
        n_samples, return_mean
            Number of posterior draws; ``n_samples > 1`` with ``return_mean=False``: every draw,
            arrays ``(n_cells, n_features, n_samples)`` as scvi-tools 1.4.2 returns them.
        return_numpy
            Arrays instead of DataFrames (default: DataFrames, except for every draw).
        silent, progress_bar
            ``silent=False`` (or ``progress_bar=True``) shows a progress bar over cell chunks.
        given_counts
            ``None`` (default): ``True`` unless ``transform_batch`` is given; see above.

        Returns
        -------
        ``(rna, protein)``.
        """
        data, idx = self._prepare(adata, indices)
        idx = self._sample_cells(idx, n_samples_overall)
        g_sel = self._select(list(map(str, self.adata.var_names)), gene_list, "genes")
        p_sel = self._select(self.registry["protein_names"], protein_list, "proteins")
        weight = PI_GIVEN_Y if self._given_counts(given_counts, transform_batch) else "pi"
        sites = ["rho", "alpha", weight, "beta"] + (["l"] if library_size == "latent" and
                                                    not self.module.use_observed_lib_size else [])
        g_t, p_t = torch.from_numpy(g_sel).to(self.device), torch.from_numpy(p_sel).to(self.device)
        denoised = self._denoised(library_size, sample_protein_mixing,
                                  include_protein_background, scale_protein, weight)
        all_draws = n_samples > 1 and not return_mean
        rna_out, pro_out = self._average_draws(
            data, idx, batch_size, self._batch_codes(transform_batch), n_samples, sites,
            lambda mb, d: tuple(v[:, t] for v, t in zip(denoised(mb, d), (g_t, p_t))),
            (len(g_sel), len(p_sel)), not all_draws, progress_bar or not silent,
            "Normalized expression")
        if all_draws:  # (samples, cells, features) -> scvi-tools' (cells, features, samples)
            return np.moveaxis(rna_out, 0, -1), np.moveaxis(pro_out, 0, -1)
        if return_numpy:
            return rna_out, pro_out
        names = self._cell_names(adata, idx)
        genes = np.asarray(self.adata.var_names)[g_sel]
        proteins = np.asarray(self.registry["protein_names"])[p_sel]
        return (pd.DataFrame(rna_out, index=names, columns=genes),
                pd.DataFrame(pro_out, index=names, columns=proteins))

    def _given_counts(self, given_counts: bool | None, transform_batch) -> bool:
        """``given_counts`` resolved: ``None`` means True unless ``transform_batch`` is given."""
        if given_counts is None:
            return transform_batch is None
        if given_counts and transform_batch is not None:
            raise ValueError(
                "given_counts=True conditions on the observed protein counts, which were measured "
                "in each cell's own batch, not in transform_batch; use given_counts=False (the "
                "prior weight pi) for counterfactual batches")
        return bool(given_counts)

    @torch.no_grad()
    def get_protein_foreground_probability(
        self,
        adata: AnnData | None = None,
        indices=None,
        transform_batch=None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        given_counts: bool | None = None,
    ):
        r"""Probability that each cell's protein count is foreground, averaged over q.

        With ``given_counts`` (the default) it is the posterior *responsibility* of the
        foreground for the observed count :math:`y_{nt}`, by Bayes' rule on the two components
        of Eqs. (12)-(14):

        .. math::
            P(v_{nt} = 0 \mid y_{nt}, z_n, \beta_{nt}) =
            \frac{(1 - \pi_{nt})\,\mathrm{NB}(y_{nt}; \beta_{nt}\alpha_{nt}, \phi_t)}
            {\pi_{nt}\,\mathrm{NB}(y_{nt}; \beta_{nt}, \phi_t)
             + (1 - \pi_{nt})\,\mathrm{NB}(y_{nt}; \beta_{nt}\alpha_{nt}, \phi_t)},

        returned as :math:`E_{q(z, \beta \mid x, y, s)}` of it (``n_samples`` draws): the
        probability that the count *observed* in this cell is foreground. ``given_counts=False``
        returns scvi-tools' quantity, :math:`E_q[1 - \pi_{nt}]`: the prior weight of the
        foreground given ``z``, before the count is seen (a cell whose count sits at the
        background level may still get a high value there if its neighbours in ``z`` are
        foreground). Where a protein was not measured there is no count and both are
        :math:`E_q[1 - \pi_{nt}]`; declared isotype controls are background (0) either way.

        Parameters
        ----------
        transform_batch
            Decode as if in this batch (or the average over a list); needs
            ``given_counts=False``, since the counts were observed in the cell's own batch.
        given_counts
            ``True``: the responsibility above; ``False``: :math:`E_q[1 - \pi]`; ``None``
            (default): ``True`` unless ``transform_batch`` is given.
        n_samples, return_mean, return_numpy, batch_size, silent
            As scvi-tools (``silent=False`` shows a progress bar over cell chunks).

        Returns
        -------
        DataFrame (cells x proteins), or an array (all draws, ``n_samples > 1`` and
        ``return_mean=False``: ``(cells, proteins, n_samples)``, as scvi-tools 1.4.2).
        """
        given = self._given_counts(given_counts, transform_batch)
        data, idx = self._prepare(adata, indices)
        p_sel = self._select(self.registry["protein_names"], protein_list, "proteins")
        p_t = torch.from_numpy(p_sel).to(self.device)
        site = PI_GIVEN_Y if given else "pi"
        all_draws = n_samples > 1 and not return_mean
        (out,) = self._average_draws(
            data, idx, batch_size, self._batch_codes(transform_batch), n_samples, [site],
            lambda mb, d: (1 - d[site][:, p_t],), (len(p_sel),), not all_draws, not silent,
            "Foreground probability")
        if all_draws:  # (samples, cells, proteins) -> scvi-tools' (cells, proteins, samples)
            return np.moveaxis(out, 0, -1)
        if return_numpy:
            return out
        return pd.DataFrame(out, index=self._cell_names(adata, idx),
                            columns=np.asarray(self.registry["protein_names"])[p_sel])

    def get_protein_positive_calls(
        self,
        adata: AnnData | None = None,
        indices=None,
        protein_list: Sequence[str] | None = None,
        threshold: float = 0.5,
        n_samples: int = 10,
        given_counts: bool = True,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        r"""Call each protein positive (foreground) or not in each cell: a boolean DataFrame.

        A cell is positive for protein ``t`` when its foreground probability
        (:meth:`get_protein_foreground_probability`, by default the posterior
        :math:`E_q[P(v_{nt} = 0 \mid y_{nt}, z_n, \beta_{nt})]` from ``n_samples`` draws)
        exceeds ``threshold``. Declared isotype controls are never positive. Gate on these
        calls, or tabulate them with :meth:`get_protein_foreground_summary`.
        """
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        fg = self.get_protein_foreground_probability(
            adata, indices, protein_list=protein_list, n_samples=n_samples,
            batch_size=batch_size, given_counts=given_counts)
        return fg > threshold

    def get_protein_foreground_summary(
        self,
        adata: AnnData | None = None,
        indices=None,
        threshold: float = 0.5,
        n_samples: int = 10,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Per protein: how often it is foreground, and its background level in each batch.

        Columns: ``isotype_control`` (declared at setup), ``mean_foreground_probability`` and
        ``fraction_positive`` (cells called positive at ``threshold``, see
        :meth:`get_protein_positive_calls`), and ``background_mean_<batch>``: the mean over the
        batch's cells of :math:`E_q[\beta_{nt}]`, the expected background count (ambient and
        non-specific antibody) of protein ``t``; NaN for a batch without cells among
        ``indices``. One row per protein, ready for a table.
        """
        data, idx = self._prepare(adata, indices)
        fg = self.get_protein_foreground_probability(adata, idx, n_samples=n_samples,
                                                     batch_size=batch_size, given_counts=True)
        background = self.get_protein_background_mean(adata, idx, n_samples=n_samples,
                                                      batch_size=batch_size)
        names = [str(p) for p in self.registry["protein_names"]]
        isotypes = set(str(p) for p in self.registry.get("isotype_controls") or [])
        table = pd.DataFrame({
            "isotype_control": [p in isotypes for p in names],
            "mean_foreground_probability": fg.to_numpy().mean(0),
            "fraction_positive": (fg.to_numpy() > threshold).mean(0)}, index=names)
        table.index.name = "protein"
        batches = data.batch[idx]
        for code, category in enumerate(self.registry["batch_categories"]):
            cells = batches == code
            table[f"background_mean_{category}"] = (background[cells].mean(0) if cells.any()
                                                    else np.nan)
        return table

    @torch.no_grad()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Counts drawn from p(x, y | z, l, beta) with (z, l, beta) ~ q: replicated data.

        The guide draws the latent variables from the observed cells, then the model, replayed on
        them and given no counts, samples ``x`` and ``y`` (all draws at once, see
        :meth:`_traces`).

        Returns
        -------
        As scvi-tools 1.4: ``{"rna": ..., "protein": ...}`` (for a model of a MuData, keyed by
        the RNA and protein modality names), arrays of shape ``(n_cells, n_features)``, or
        ``(n_cells, n_features, n_samples)`` when ``n_samples > 1`` (all draws are returned).
        """
        data, idx = self._prepare(adata, indices)
        g_sel = self._select(list(map(str, self.adata.var_names)), gene_list, "genes")
        p_sel = self._select(self.registry["protein_names"], protein_list, "proteins")
        rna = np.zeros((len(idx), len(g_sel), n_samples), dtype=np.float32)
        pro = np.zeros((len(idx), len(p_sel), n_samples), dtype=np.float32)
        with self.module.fast_calls():
            for pos, mb in self._chunks(data, idx, batch_size):
                _, rep = self._traces(mb, n_samples, observed=False)
                # select the features on the device: only they are copied back
                rna[pos] = rep.nodes["x"]["value"][..., g_sel].permute(1, 2, 0).cpu().numpy()
                pro[pos] = rep.nodes["y"]["value"][..., p_sel].permute(1, 2, 0).cpu().numpy()
        if n_samples == 1:
            rna, pro = rna[..., 0], pro[..., 0]
        if self.mdata is not None:
            mods = self.registry["mudata"]["modalities"]
            return {mods["rna_layer"]: rna, mods["protein_layer"]: pro}
        return {"rna": rna, "protein": pro}

    @torch.no_grad()
    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 10,
        batch_size: int | None = None,
        rna_size_factor: float = 1000,
        transform_batch=None,
        correlation_type: str = "spearman",
        log_transform: bool = False,
        silent: bool = True,
    ) -> pd.DataFrame:
        """Correlation of genes and proteins over cells and posterior draws of denoised values.

        Draws are ``rna_size_factor * rho`` and ``(1 - v) beta alpha`` with ``v ~ Bernoulli(pi)``,
        one per cell, sample and ``transform_batch`` entry. Pearson uses running sums (memory
        O(features^2)); Spearman needs the ranks of all draws, so it keeps them
        (cells x n_samples x features float32): subsample cells with ``indices`` for big data.
        ``silent=False`` shows a progress bar over cell chunks.
        """
        if correlation_type not in ("spearman", "pearson"):
            raise ValueError("correlation_type must be 'spearman' or 'pearson'")
        data, idx = self._prepare(adata, indices)
        names = list(map(str, self.adata.var_names)) + list(self.registry["protein_names"])
        kept, n, s1, s2 = [], 0, 0.0, 0.0
        chunks = tqdm(self._chunks(data, idx, batch_size), disable=silent, desc="Correlation",
                      total=-(-len(idx) // (batch_size or _CHUNK)))
        with self.module.fast_calls():
            for _, mb in chunks:
                for code in self._batch_codes(transform_batch):
                    for d in self._draws(mb, n_samples, code, ["rho", "alpha", "pi", "beta"]):
                        v = torch.bernoulli(d["pi"])
                        vals = torch.cat([rna_size_factor * d["rho"],
                                          (1 - v) * d["beta"] * d["alpha"]], dim=-1).double()
                        if log_transform:
                            vals = torch.log1p(vals)
                        if correlation_type == "spearman":
                            kept.append(vals.float().cpu().numpy())
                        else:
                            n, s1, s2 = n + len(vals), s1 + vals.sum(0), s2 + vals.T @ vals
        if correlation_type == "spearman":
            from scipy.stats import rankdata

            ranks = rankdata(np.concatenate(kept), axis=0)
            corr = np.corrcoef(ranks, rowvar=False)
        else:
            mean = s1 / n
            cov = s2 / n - torch.outer(mean, mean)
            sd = cov.diagonal().clamp_min(1e-30).sqrt()
            corr = (cov / torch.outer(sd, sd)).cpu().numpy()
        return pd.DataFrame(corr, index=names, columns=names)

    # -- likelihood ----------------------------------------------------------------------------
    def get_elbo(self, adata: AnnData | None = None, indices=None, batch_size: int = 1024,
                 return_mean: bool = True) -> float | np.ndarray:
        """ELBO per cell (higher is better, as scvi-tools): full KL weight, analytic KL; the mean
        over cells, or (``return_mean=False``) one value per cell.

        ``history["elbo_*"]`` holds the negative of this quantity (lower is better), as in
        scvi-tools' training history.
        """
        data, idx = self._prepare(adata, indices)
        terms, _ = cell_terms(self.module, data, idx, batch_size)
        elbo = -sum(terms.values())
        return float(elbo.mean()) if return_mean else elbo

    def get_reconstruction_error(self, adata: AnnData | None = None, indices=None,
                                 batch_size: int = 1024, return_mean: bool = True) -> dict:
        """Negative log-likelihood per cell under one draw of q (lower is better), per modality:
        ``{"reconst_loss_gene": ..., "reconst_loss_protein": ...}`` as scvi-tools (an observed
        site that a model extension adds appears as ``"reconst_loss_<site>"``); means over cells,
        or one value per cell with ``return_mean=False``. Their sum is the ``reconstruction_loss``
        of the training history."""
        data, idx = self._prepare(adata, indices)
        terms, observed = cell_terms(self.module, data, idx, batch_size)
        names = {"x": "reconst_loss_gene", "y": "reconst_loss_protein"}
        out = {names.get(site, f"reconst_loss_{site}"): terms[site]
               for site in sorted(observed, key=lambda k: (k not in names, k)) if site in terms}
        return {k: float(v.mean()) for k, v in out.items()} if return_mean else out

    @torch.no_grad()
    def get_marginal_ll(self, adata: AnnData | None = None, indices=None,
                        n_mc_samples: int = 1000, batch_size: int | None = None,
                        return_mean: bool = True) -> float | np.ndarray:
        r"""Importance-sampled :math:`\log p(x, y)` per cell (mean over cells, or one value per
        cell with ``return_mean=False``; higher is better).

        :math:`\log \frac1K \sum_k p(x, y, z_k, l_k, \beta_k) / q(z_k, l_k, \beta_k \mid x, y)`
        with the guide as proposal, ``v`` summed out; the weights come from the one trace scorer
        (:func:`pyro_totalvi.scoring.trace_terms`, non-model factors left out). By Jensen's
        inequality it is at least the ELBO (``get_elbo()``) in expectation, and tighter as
        ``n_mc_samples`` grows.
        """
        data, idx = self._prepare(adata, indices)
        out = np.zeros(len(idx))
        with self.module.fast_calls():
            for pos, mb in self._chunks(data, idx, batch_size):
                log_w = torch.stack([
                    sum(score_minibatch(self.module, mb, data.n_obs, kl="sample")[0].values())
                    for _ in range(n_mc_samples)])
                out[pos] = (torch.logsumexp(log_w.double(), 0)
                            - np.log(n_mc_samples)).cpu().numpy()
        return float(out.mean()) if return_mean else out

    @torch.no_grad()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        r"""Parameters of p(x, y | z, l, beta) at draws of q, per cell (scvi-tools 1.4.2's TOTALVI
        raises ``NotImplementedError`` here; the keys follow its SCVI's ``"mean"`` and
        ``"dispersions"``).

        Returns
        -------
        ``"mean"`` (:math:`l_n \rho_{ng}`) and ``"dispersions"`` (:math:`\theta_g`) of the RNA
        NB; ``"protein_back_mean"`` (:math:`\beta_{nt}`), ``"protein_fore_mean"``
        (:math:`\beta_{nt}\alpha_{nt}`), ``"protein_mixing"`` (:math:`\pi_{nt}`, the
        probability of background) and ``"protein_dispersions"`` (:math:`\phi_t`) of the
        protein mixture. Arrays ``(cells, features)``; with ``n_samples > 1``, one leading axis
        of draws, averaged away by ``give_mean=True``.
        """
        data, idx = self._prepare(adata, indices)
        theta, phi = self.module.log_theta.exp(), self.module.log_phi.exp()
        sites = ["rho", "alpha", "pi", "beta"] + ([] if self.module.use_observed_lib_size
                                                  else ["l"])
        lib = self._denoised("latent")

        def params(mb, d):
            mean, _ = lib(mb, d)
            return (mean, theta.expand_as(mean), d["beta"], d["beta"] * d["alpha"], d["pi"],
                    phi.expand_as(d["pi"]))

        keep = n_samples > 1 and not give_mean
        G, T = self.module.n_genes, self.module.n_proteins
        outs = self._average_draws(data, idx, batch_size, [None], n_samples, sites, params,
                                   (G, G, T, T, T, T), not keep)
        keys = ("mean", "dispersions", "protein_back_mean", "protein_fore_mean",
                "protein_mixing", "protein_dispersions")
        return dict(zip(keys, outs))

    # -- helpers -------------------------------------------------------------------------------
    def _cell_names(self, adata: AnnData | None, idx: np.ndarray) -> pd.Index:
        return (self.adata if adata is None else adata).obs_names[idx]


