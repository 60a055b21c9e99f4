#!/usr/bin/env python
"""Benchmark pyro_totalvi against scvi-tools' TOTALVI on the same AnnData.

Run from the repo root with the benchmark venv (see benchmarks/setup_env.sh):

    benchmarks/.venv-scvi/bin/python benchmarks/compare_scvi.py --data sim10k

Every measurement runs in a fresh child process (this same file, ``--_child``), so that peak
RSS values are separable:

* ``train``  : build model, train, read history and ELBOs, save the model;
* ``latent`` : load the saved model, ``get_latent_representation()``;
* ``normexpr``: load, ``get_normalized_expression(n_samples=25)``;
* ``de``     : load, ``differential_expression(groupby, group1, group2)``.

A side whose model cannot be saved/loaded runs the three inference calls inside the training
child instead (reported as ``isolated: false``; their RSS then comes from the in-process
sampler only).  Peak RSS of each child is the kernel's ``ru_maxrss`` obtained with
``os.wait4``; the "increment" is the in-process psutil sampler's peak during the call minus the
RSS just before the call.

The data set is generated/loaded once by the parent and written to a temporary directory
outside the repository (never into the repo: the eccite data must not be copied there).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
ECCITE_PATH = REPO_ROOT.parent / "shared" / "data" / "eccite_pbmc_500.h5ad"
SIM_SIZES = {"sim10k": 10_000, "sim50k": 50_000}
SIDES = ("scvi", "ours")
PHASES_INFER = ("latent", "normexpr", "de")
N_SAMPLES_NORM = 25
BATCH_SIZE = 256
TRAIN_SIZE = 0.9
N_LATENT = 20


# --------------------------------------------------------------------------------------------
# pyro_totalvi import
# --------------------------------------------------------------------------------------------
def import_pyro_totalvi():
    """The pyro_totalvi package (installed, or from the repository root)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import pyro_totalvi

    return pyro_totalvi


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def prepare_data(args):
    """Build the benchmark AnnData (same object for both sides). Returns (adata, info)."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    info = {"data": args.data}
    if args.data == "eccite":
        if not ECCITE_PATH.exists():
            sys.exit(f"eccite data not found at {ECCITE_PATH}")
        adata = anndata.read_h5ad(ECCITE_PATH)
        X = sp.csr_matrix(adata.X)
        detected = np.asarray((X > 0).sum(0)).ravel()
        top = np.sort(np.argsort(-detected, kind="stable")[: args.n_genes])
        adata = adata[:, top].copy()
        keep = np.asarray(adata.X.sum(1)).ravel() > 0
        adata = adata[keep].copy()
        if "batch" not in adata.obs:
            adata.obs["batch"] = "0"
        adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
        for k in list(adata.obsm.keys()):  # keep only what the models use
            if k != "protein_expression":
                del adata.obsm[k]
        info["generator"] = f"{ECCITE_PATH.name}, top {args.n_genes} genes by detection"
    else:
        n_cells = 1000 if args.small else SIM_SIZES[args.data]
        n_cells += int(round(n_cells * args.heldout_frac))  # split off in run_prepare
        # simulated with the package's own generator (the scvi side only needs it installed)
        adata = import_pyro_totalvi().simulate(
            n_cells, n_genes=args.n_genes, n_proteins=30, n_batches=2, seed=args.seed)
        info["generator"] = "pyro_totalvi.simulate"
        adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")

    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    pe = adata.obsm["protein_expression"]
    if not isinstance(pe, pd.DataFrame):
        pe = pd.DataFrame(
            np.asarray(pe, dtype=np.float32),
            index=adata.obs_names,
            columns=[f"prot{i}" for i in range(np.shape(pe)[1])],
        )
        adata.obsm["protein_expression"] = pe
    adata.obs_names_make_unique()

    # DE groups: two largest labelled groups, else k-means(2) on CLR protein counts.
    label_col = next(
        (c for c in ("cell_type", "celltype", "labels", "label", "cluster", "group") if c in adata.obs),
        None,
    )
    if label_col is not None and adata.obs[label_col].nunique() >= 2:
        groups = adata.obs[label_col].astype(str)
        info["de_source"] = label_col
    else:
        from sklearn.cluster import KMeans

        logp = np.log1p(np.asarray(pe, dtype=np.float64))
        clr = logp - logp.mean(1, keepdims=True)
        km = KMeans(n_clusters=2, n_init=10, random_state=args.seed).fit(clr)
        groups = pd.Series(km.labels_.astype(str), index=adata.obs_names)
        info["de_source"] = "kmeans(2) on CLR protein"
    adata.obs["bench_group"] = pd.Categorical(groups.values)
    top2 = adata.obs["bench_group"].value_counts().index[:2].tolist()
    info.update(
        groupby="bench_group",
        group1=str(top2[0]),
        group2=str(top2[1]),
        n_cells=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        n_proteins=int(adata.obsm["protein_expression"].shape[1]),
        n_batches=int(adata.obs["batch"].nunique()),
    )
    return adata, info


# --------------------------------------------------------------------------------------------
# RSS sampler (runs inside a child)
# --------------------------------------------------------------------------------------------
class RssSampler:
    def __init__(self, interval=0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def rss(self):
        return self._proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            r = self.rss()
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def measure(self, fn):
        """Run fn(); return (result, seconds, rss_before_mb, peak_during_mb)."""
        before = self.rss()
        self.peak = before
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        peak = max(self.peak, self.rss())
        return out, dt, before / 2**20, peak / 2**20

    def stop(self):
        self._stop.set()


# --------------------------------------------------------------------------------------------
# side adapters
# --------------------------------------------------------------------------------------------
class ScviSide:
    name = "scvi"
    can_save = True

    def __init__(self, args):
        import scvi

        self.scvi = scvi
        scvi.settings.seed = args.seed
        scvi.settings.verbosity = 30
        scvi.settings.dl_num_workers = 0
        self.args = args
        self.model = None

    def model_kwargs(self):
        # scvi-tools defaults already match the planned pyro_totalvi architecture (n_hidden=256,
        # 2-layer encoder, 1-layer decoder, NB genes, observed library size, batch injected into
        # the encoder: encode_covariates=True). Extra kwargs via --scvi-model-kwargs (JSON).
        kw = dict(n_latent=N_LATENT)
        kw.update(json.loads(self.args.scvi_model_kwargs or "{}"))
        return kw

    def setup(self, adata):
        self.scvi.model.TOTALVI.setup_anndata(
            adata, protein_expression_obsm_key="protein_expression", batch_key="batch"
        )

    def create(self, adata):
        self.setup(adata)
        self.model = self.scvi.model.TOTALVI(adata, **self.model_kwargs())

    def train(self, epochs):
        self.model.train(
            max_epochs=epochs,
            batch_size=BATCH_SIZE,
            train_size=TRAIN_SIZE,
            early_stopping=False,
            plan_kwargs=json.loads(self.args.scvi_plan_kwargs or "{}") or None,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=self.args.accelerator,
            **json.loads(self.args.scvi_train_kwargs or "{}"),
        )

    def n_train(self):
        return len(self.model.train_indices)

    def val_indices(self):
        return self.model.validation_indices

    def history_last(self):
        h = self.model.history
        out = {}
        for k in ("elbo_train", "elbo_validation"):
            if k in h and len(h[k]):
                out[k] = float(h[k].iloc[-1, 0])
        return out

    def neg_elbo(self, indices, adata=None):
        # scvi's get_elbo returns the ELBO (higher is better) averaged over cells, computed
        # as -(reconstruction + kl_local) with KL weight 1: negate for the negative ELBO.
        return float(-self.model.get_elbo(adata=adata, indices=indices, batch_size=BATCH_SIZE))

    def neg_elbo_terms(self, indices, adata=None):
        """Per-cell means of scvi's loss terms, and the 'pure' negative ELBO without the two
        non-ELBO penalties that scvi 1.4 folds into kl_div_back_pro."""
        import torch

        module = self.model.module
        module.eval()
        adata = self.model._validate_anndata(adata)  # transfers the setup to held-out data
        dl = self.model._make_data_loader(adata=adata, indices=indices, batch_size=BATCH_SIZE)
        sums, n = {}, 0
        lognorm = torch.distributions.LogNormal(torch.tensor(0.0), torch.tensor(1.0))
        with torch.inference_mode():
            for tensors in dl:
                _, gen, losses = module(tensors)
                terms = dict(losses.reconstruction_loss)
                terms.update(losses.kl_local)
                eff = gen["per_batch_efficiency"]
                terms["pen_batch_efficiency"] = -lognorm.log_prob(eff).sum(1)
                mixing = gen["py_"]["mixing"]
                terms["pen_protein_expressed"] = -1e-3 * torch.distributions.Bernoulli(
                    logits=mixing
                ).log_prob(torch.ones_like(mixing)).sum(1)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.sum())
                n += next(iter(terms.values())).shape[0]
        means = {k: v / n for k, v in sums.items()}
        means["neg_elbo_scvi"] = (
            means["reconst_loss_gene"] + means["reconst_loss_protein"]
            + means["kl_div_z"] + means["kl_div_l_gene"] + means["kl_div_back_pro"]
        )
        means["neg_elbo_pure"] = (
            means["neg_elbo_scvi"] - means["pen_batch_efficiency"] - means["pen_protein_expressed"]
        )
        return means

    def latent(self):
        return self.model.get_latent_representation(batch_size=BATCH_SIZE)

    def normexpr(self):
        return self.model.get_normalized_expression(n_samples=N_SAMPLES_NORM, batch_size=BATCH_SIZE)

    def de(self, groupby, g1, g2):
        return self.model.differential_expression(
            groupby=groupby, group1=g1, group2=g2, silent=True
        )

    def save(self, path):
        self.model.save(path, overwrite=True, save_anndata=False)

    def load(self, path, adata):
        self.setup(adata)
        self.model = self.scvi.model.TOTALVI.load(path, adata=adata,
                                                  accelerator=self.args.accelerator)


class OursSide:
    name = "ours"

    def __init__(self, args):
        self.pt = import_pyro_totalvi()
        self.args = args
        self.model = None
        cls = self.pt.TOTALVI
        self.can_save = hasattr(cls, "load") and hasattr(cls, "save")

    def setup(self, adata):
        self.pt.TOTALVI.setup_anndata(
            adata, protein_expression_obsm_key="protein_expression", batch_key="batch"
        )

    def create(self, adata):
        self.setup(adata)
        kw = dict(n_latent=N_LATENT, protein_mixture="marginal")
        kw.update(json.loads(self.args.ours_model_kwargs or "{}"))
        self.model = self.pt.TOTALVI(adata, **kw)

    def train(self, epochs):
        self.model.train(
            max_epochs=epochs,
            batch_size=BATCH_SIZE,
            train_size=TRAIN_SIZE,
            early_stopping=False,
            seed=self.args.seed,
            progress_bar=False,
            accelerator=self.args.accelerator,
            **json.loads(self.args.ours_train_kwargs or "{}"),
        )

    def _split(self, name):
        idx = getattr(self.model, name + "_indices", None)
        if idx is None:
            split = getattr(self.model, "split", None) or {}
            idx = split.get(name) if isinstance(split, dict) else None
        return idx

    def n_train(self):
        idx = self._split("train")
        if idx is not None:
            return len(idx)
        return int(math.ceil(TRAIN_SIZE * self.model.adata.n_obs))

    def val_indices(self):
        return self._split("validation")

    def history_last(self):
        h = self.model.history
        out = {}
        for k in ("elbo_train", "elbo_validation"):
            if k in h and len(h[k]):
                out[k] = float(h[k].dropna().iloc[-1])
        return out

    def neg_elbo(self, indices, adata=None):
        # both return the ELBO; report -ELBO
        return float(-self.model.get_elbo(adata=adata, indices=indices))

    def neg_elbo_terms(self, indices, adata=None):
        """Per-cell means of the same terms as scvi's (v summed out, analytic KL, one draw)."""
        import numpy as np

        from pyro_totalvi.scoring import elbo_terms

        data = self.model._data(adata)
        terms = elbo_terms(self.model.module, data,
                           np.arange(data.n_obs) if indices is None else indices)
        # the per-cell background shift (ours only) is part of the background's KL
        names = {"x": "reconst_loss_gene", "y": "reconst_loss_protein", "z": "kl_div_z",
                 "l": "kl_div_l_gene", "beta": "kl_div_back_pro",
                 "background_scale": "kl_div_back_pro"}
        means = {}
        for k, v in terms.items():
            means[names[k]] = means.get(names[k], 0.0) + v
        means["neg_elbo_pure"] = sum(means.values())  # no penalty terms on this side
        return means

    def latent(self):
        return self.model.get_latent_representation()

    def normexpr(self):
        return self.model.get_normalized_expression(n_samples=N_SAMPLES_NORM)

    def de(self, groupby, g1, g2):
        return self.model.differential_expression(groupby=groupby, group1=g1, group2=g2)

    def save(self, path):
        self.model.save(path, overwrite=True)

    def load(self, path, adata):
        self.setup(adata)
        self.model = self.pt.TOTALVI.load(path, adata=adata, accelerator=self.args.accelerator)


def make_side(name, args):
    return ScviSide(args) if name == "scvi" else OursSide(args)


# --------------------------------------------------------------------------------------------
# child process
# --------------------------------------------------------------------------------------------
def _score_after_training(args, side, res: dict) -> None:
    """The trained side's last history values and -ELBOs (validation, all, held-out cells), into
    ``res``; every call starts from the same seed, so both sides' ELBOs use the same draws."""
    import anndata
    import numpy as np
    import torch

    res.update({"history_" + k: v for k, v in side.history_last().items()})
    val = side.val_indices()
    torch.manual_seed(args.seed)
    if val is not None and len(val):
        res["n_val_cells"] = int(len(val))
        res["val_neg_elbo"] = side.neg_elbo(np.asarray(val))
        torch.manual_seed(args.seed)  # same MC draws as the line above
        terms = side.neg_elbo_terms(np.asarray(val))
        if terms:
            res["val_terms"] = terms
            res["val_neg_elbo_pure"] = terms["neg_elbo_pure"]
    torch.manual_seed(args.seed)
    res["all_neg_elbo"] = side.neg_elbo(None)
    held_path = Path(args._h5ad).with_name("heldout.h5ad")
    if held_path.exists():
        held = anndata.read_h5ad(held_path)
        res["n_heldout_cells"] = held.n_obs
        torch.manual_seed(args.seed)
        res["heldout_neg_elbo"] = side.neg_elbo(None, held)
        torch.manual_seed(args.seed)
        terms = side.neg_elbo_terms(None, held)
        res.update({"heldout_" + k: v for k, v in terms.items()})


def run_child(args):
    import anndata
    import numpy as np
    import torch

    # Imported here for both sides, before any timing: importing scvi-tools loads it, pyro_totalvi
    # does not, so otherwise the first optimiser step of our train() would pay its one-time
    # import (1-2 s, a lazy import inside torch.optim) and scvi-tools' would not.
    importlib.import_module("torch._dynamo")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    # Training is sampled every 50 ms, not 5: a thread waking every 5 ms to read /proc competes
    # for the GIL and slowed pyro_totalvi's training by 9-10 % (scvi-tools' not measurably), while
    # training memory is flat enough for 50 ms; the process peak (VmHWM) is exact either way.
    sampler = RssSampler(0.05 if args.phase == "train" else 0.005)
    res = {"side": args.side, "phase": args.phase, "torch_threads": torch.get_num_threads()}
    meta = json.loads(Path(args._meta).read_text())
    t0 = time.perf_counter()
    adata = anndata.read_h5ad(args._h5ad)
    side = make_side(args.side, args)
    res["version"] = _version(side)
    res["load_data_s"] = time.perf_counter() - t0

    def infer_phase(phase, prefix=""):
        calls = {
            "latent": side.latent,
            "normexpr": side.normexpr,
            "de": lambda: side.de(meta["groupby"], meta["group1"], meta["group2"]),
        }
        torch.manual_seed(args.seed)
        out, dt, before, peak = sampler.measure(calls[phase])
        res[prefix + "time_s"] = dt
        res[prefix + "rss_before_mb"] = before
        res[prefix + "rss_peak_sampled_mb"] = peak
        res[prefix + "rss_increment_mb"] = peak - before
        res[prefix + "output_shape"] = _shape(out)

    if args.phase == "train":
        side.create(adata)
        _, dt, before, peak = sampler.measure(lambda: side.train(args.epochs))
        n_train = side.n_train()
        res.update(
            train_s=dt,
            epochs=args.epochs,
            s_per_epoch=dt / args.epochs,
            n_train_cells=n_train,
            train_cells_per_s=n_train * args.epochs / dt,
            train_rss_before_mb=before,
            train_rss_peak_sampled_mb=peak,
            train_rss_increment_mb=peak - before,
        )
        _score_after_training(args, side, res)
        if side.can_save and not args.no_isolate:
            side.save(args._model_dir)
            res["saved_model"] = True
        else:
            res["saved_model"] = False
            for ph in args.phases.split(","):
                if ph:
                    infer_phase(ph, prefix=ph + "_")
    else:
        side.load(args._model_dir, adata)
        infer_phase(args.phase)
    sampler.stop()
    res["vm_hwm_mb"] = _vm_hwm_mb()
    if torch.cuda.is_initialized():  # peak GPU memory held by torch tensors in this process
        res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args._out).write_text(json.dumps(res))


def _vm_hwm_mb():
    """Peak RSS of this process since exec (VmHWM), in MiB; None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run_prepare(args):
    """Child phase 'prepare': build the data set, write data.h5ad + meta.json."""
    t0 = time.perf_counter()
    adata, info = prepare_data(args)
    # A held-out set that neither side trains on (each side also draws its own validation split
    # from the training cells): the ELBOs of both models are compared on these same cells.
    import numpy as np

    rng = np.random.default_rng(args.seed + 1)
    n_held = int(round(adata.n_obs * args.heldout_frac / (1 + args.heldout_frac)))
    held = np.zeros(adata.n_obs, dtype=bool)
    held[rng.choice(adata.n_obs, n_held, replace=False)] = True
    if n_held:
        adata[held].copy().write_h5ad(Path(args._h5ad).with_name("heldout.h5ad"))
    adata = adata[~held].copy()
    info.update(n_cells=int(adata.n_obs), n_heldout_cells=int(n_held))
    adata.write_h5ad(args._h5ad)
    info["build_s"] = time.perf_counter() - t0
    Path(args._meta).write_text(json.dumps(info))


def _version(side):
    try:
        if side.name == "scvi":
            return side.scvi.__version__
        return getattr(side.pt, "__version__", "dev")
    except Exception:
        return None


def _shape(out):
    if isinstance(out, tuple):
        return [_shape(o) for o in out]
    return list(getattr(out, "shape", ()))


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def spawn(args, side, phase, tmp, extra_env):
    out = tmp / f"{side}_{phase}.json" if side else tmp / "meta.json"
    log = tmp / f"{side}_{phase}.log"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--_child",
        "--side", side or "none", "--phase", phase,
        "--epochs", str(args.epochs), "--threads", str(args.threads), "--seed", str(args.seed),
        "--_h5ad", str(tmp / "data.h5ad"), "--_meta", str(tmp / "meta.json"),
        "--_model_dir", str(tmp / f"model_{side}"), "--_out", str(out),
    ]
    for flag in ("scvi_model_kwargs", "scvi_plan_kwargs", "scvi_train_kwargs",
                 "ours_model_kwargs", "ours_train_kwargs", "n_genes", "accelerator",
                 "heldout_frac"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.small:
        cmd.append("--small")
    cmd += ["--data", args.data]
    if args.no_isolate:
        cmd.append("--no-isolate")
    cmd += ["--phases", args.phases]
    print(f"[{side}] {phase} ..." if side else f"{phase} ...", end=" ", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=extra_env, cwd=REPO_ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not out.exists():
        print(f"FAILED (rc={p.returncode}); last lines of {log}:")
        print("".join(log.read_text().splitlines(True)[-30:]))
        return None
    res = json.loads(out.read_text())
    res["process_wall_s"] = wall
    # ru_maxrss of a child starts from the RSS of its parent at exec time (Linux keeps the
    # high-water mark across fork+exec); the parent stays small, and VmHWM, read by the child
    # itself, is preferred.
    res["ru_maxrss_mb"] = ru.ru_maxrss / 1024.0  # Linux: KiB
    res["process_peak_rss_mb"] = res.get("vm_hwm_mb") or res["ru_maxrss_mb"]
    print(f"done in {wall:.1f} s (peak RSS {res['process_peak_rss_mb']:.0f} MB)")
    return res


def run_parent(args):
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES_INFER:
            sys.exit(f"unknown phase {p!r}; choose from {PHASES_INFER}")
    for s in sides:
        if s not in SIDES:
            sys.exit(f"unknown side {s!r}; choose from {SIDES}")
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[v] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["TOTALVI_BENCH_CHILD"] = "1"

    tmp = Path(tempfile.mkdtemp(prefix="totalvi_bench_"))  # outside the repo
    try:
        # The parent never imports numpy/torch/anndata: the data set is built in a child too, so
        # that no child inherits a large RSS high-water mark from the parent.
        info = spawn(args, None, "prepare", tmp, env)
        if info is None:
            return 1
        for k in ("process_wall_s", "ru_maxrss_mb", "process_peak_rss_mb"):
            info.pop(k, None)
        print(
            f"data {info['data']}: {info['n_cells']} cells x {info['n_genes']} genes, "
            f"{info['n_proteins']} proteins, {info['n_batches']} batches "
            f"({info['generator']}; built in {info['build_s']:.1f} s); "
            f"DE {info['group1']} vs {info['group2']} ({info['de_source']}); "
            f"epochs {args.epochs}, threads {args.threads}, accelerator {args.accelerator}"
        )
        results = {}
        for side in sides:
            r = spawn(args, side, "train", tmp, env)
            if r is None:
                continue
            results[side] = {"train": r}
            if r.get("saved_model"):
                for ph in phases:
                    pr = spawn(args, side, ph, tmp, env)
                    if pr is not None:
                        results[side][ph] = pr
                        results[side][ph]["isolated"] = True
            else:
                for ph in PHASES_INFER:
                    if ph + "_time_s" in r:
                        results[side][ph] = {
                            k[len(ph) + 1:]: v for k, v in r.items() if k.startswith(ph + "_")
                        }
                        results[side][ph]["isolated"] = False
    finally:
        if args.keep_tmp:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(results)
    print_table(summary, sides)
    line = {"benchmark": "pyro_totalvi_vs_scvi", "data": info, "epochs": args.epochs,
            "threads": args.threads, "accelerator": args.accelerator, "batch_size": BATCH_SIZE,
            "seed": args.seed,
            "results": summary}
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps({**line, "raw": results}, indent=1))
    print(json.dumps(line))
    return 0 if all(s in results for s in sides) else 1


METRICS = [  # (key, label, where, field)
    ("s_per_epoch", "train: seconds / epoch", "train", "s_per_epoch"),
    ("train_cells_per_s", "train: cells / s", "train", "train_cells_per_s"),
    ("train_peak_rss_mb", "train: peak RSS (MB, process)", "train", "process_peak_rss_mb"),
    ("train_rss_increment_mb", "train: RSS increment (MB)", "train", "train_rss_increment_mb"),
    ("train_gpu_peak_mb", "train: peak GPU memory (MB)", "train", "gpu_peak_mb"),
    ("heldout_neg_elbo", "-ELBO/cell, held-out cells", "train", "heldout_neg_elbo"),
    ("heldout_neg_elbo_pure", "-ELBO/cell, held-out, no penalties", "train",
     "heldout_neg_elbo_pure"),
    ("heldout_reconst_loss_gene", "  of which RNA reconstruction", "train",
     "heldout_reconst_loss_gene"),
    ("heldout_reconst_loss_protein", "  of which protein reconstruction", "train",
     "heldout_reconst_loss_protein"),
    ("heldout_kl_div_z", "  of which KL(q(z) | p(z))", "train", "heldout_kl_div_z"),
    ("heldout_kl_div_back_pro", "  of which KL background (scvi: + penalties)", "train",
     "heldout_kl_div_back_pro"),
    ("val_neg_elbo", "-ELBO/cell, validation cells (own split)", "train", "val_neg_elbo"),
    ("val_neg_elbo_pure", "-ELBO/cell, validation, no penalties", "train", "val_neg_elbo_pure"),
    ("history_elbo_validation", "-ELBO/cell, last history epoch", "train", "history_elbo_validation"),
    ("all_neg_elbo", "-ELBO/cell, all cells", "train", "all_neg_elbo"),
]
for _ph, _lab in (("normexpr", f"norm. expr. (n_samples={N_SAMPLES_NORM})"),
                  ("de", "differential_expression"), ("latent", "latent representation")):
    METRICS += [
        (f"{_ph}_s", f"{_lab}: s", _ph, "time_s"),
        (f"{_ph}_peak_rss_mb", f"{_lab}: peak RSS (MB)", _ph, "process_peak_rss_mb"),
        (f"{_ph}_rss_increment_mb", f"{_lab}: RSS increment (MB)", _ph, "rss_increment_mb"),
        (f"{_ph}_gpu_peak_mb", f"{_lab}: peak GPU memory (MB)", _ph, "gpu_peak_mb"),
    ]


def summarize(results):
    out = {}
    for side, r in results.items():
        d = {}
        for key, _, where, field in METRICS:
            v = r.get(where, {}).get(field)
            if v is not None:
                d[key] = v
        d["version"] = r["train"].get("version")
        done = [r[p] for p in PHASES_INFER if p in r]
        d["inference_isolated"] = bool(done) and all(x.get("isolated", False) for x in done)
        out[side] = d
    if "scvi" in out and "ours" in out:
        ratio = {}
        for key, *_ in METRICS:
            a, b = out["ours"].get(key), out["scvi"].get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                ratio[key] = a / b
        out["ratio_ours_over_scvi"] = ratio
    return out


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def print_table(summary, sides):
    w = max(len(m[1]) for m in METRICS) + 2
    cols = [s for s in ("scvi", "ours") if s in sides]
    head = f"{'metric':<{w}}" + "".join(f"{c:>14}" for c in cols)
    if len(cols) == 2:
        head += f"{'ours/scvi':>12}"
    print()
    print(head)
    print("-" * len(head))
    for key, label, *_ in METRICS:
        vals = [summary.get(c, {}).get(key) for c in cols]
        if all(v is None for v in vals):
            continue
        row = f"{label:<{w}}" + "".join(f"{_fmt(v):>14}" for v in vals)
        if len(cols) == 2:
            row += f"{_fmt(summary.get('ratio_ours_over_scvi', {}).get(key)):>12}"
        print(row)
    print()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["sim10k", "sim50k", "eccite"], default="sim10k")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 20; 2 with --small)")
    p.add_argument("--threads", type=int, default=2, help="torch/OMP threads per process")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"],
                   help="where both sides train and run queries (default cpu)")
    p.add_argument("--sides", default="scvi,ours", help="comma list of scvi,ours")
    p.add_argument("--small", action="store_true", help="smoke mode: 1,000 cells, 2 epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--heldout-frac", type=float, default=0.1,
                   help="extra cells (fraction of the training size) held out from both sides; "
                        "simulated data get them on top of 10,000/50,000, eccite loses them")
    p.add_argument("--phases", default=",".join(PHASES_INFER),
                   help="inference calls to measure after training (comma list; '' = none)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run inference calls inside the training process (no save/load)")
    p.add_argument("--out-json", default=None, help="also write full results (incl. raw) here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary data/model dir")
    p.add_argument("--scvi-model-kwargs", default=None, help="JSON dict for scvi TOTALVI(...)")
    p.add_argument("--scvi-plan-kwargs", default=None, help="JSON dict for scvi train(plan_kwargs=)")
    p.add_argument("--scvi-train-kwargs", default=None,
                   help='JSON dict for scvi train(...), e.g. \'{"n_epochs_kl_warmup": 400}\'')
    p.add_argument("--ours-model-kwargs", default=None, help="JSON dict for pyro_totalvi TOTALVI(...)")
    p.add_argument("--ours-train-kwargs", default=None, help="JSON dict for pyro_totalvi train(...)")
    # internal (child) arguments
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    for a in ("--_h5ad", "--_meta", "--_model_dir", "--_out"):
        p.add_argument(a, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.epochs_given = args.epochs is not None
    if args.epochs is None:
        args.epochs = 2 if args.small else 20
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        if args.phase == "prepare":
            run_prepare(args)
        else:
            run_child(args)
        return 0
    if os.environ.get("TOTALVI_BENCH_CHILD"):
        sys.exit("internal error: a benchmark child process tried to start the parent")
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
