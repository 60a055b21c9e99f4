"""Command line: python -m pyro_totalvi train INPUT.h5ad --out DIR, or ... train --demo.

Several processes: torchrun --nproc-per-node N -m pyro_totalvi train ... --distributed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

PROG = "python -m pyro_totalvi"


class CommandLineError(Exception):
    """A mistake in the command or its input: printed as one line, exit status 2."""


def _select_genes(adata, n_genes: int):
    """Keep the ``n_genes`` most detected genes (a dependency-free stand-in for HVG selection)."""
    if n_genes is None or adata.n_vars <= n_genes:
        return adata
    X = adata.X
    detected = np.asarray((X > 0).sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-detected, kind="stable")[:n_genes])
    return adata[:, keep].copy()


def _plot_history(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (("elbo_train", "train"), ("elbo_validation", "validation")):
        if col in history:
            ax.plot(history.index, history[col], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    ax.set_title("totalVI training")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``train`` and its options (each help text says its default)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train", help="train totalVI and write results",
        description="Train totalVI on an .h5ad file (or simulated data) and write the latent "
                    "space, the training history, a plot and the saved model to --out.")
    add = tr.add_argument
    add("input", nargs="?", help="an .h5ad file: RNA counts in X (or --layer), protein counts "
        "in obsm (--protein-key); give this or --demo")
    add("--demo", action="store_true", help="train on data simulated by the package instead "
        "of INPUT (default: off)")
    add("--out", metavar="DIR", default="results",
        help="output directory, created if missing (default: results)")
    add("--protein-key", metavar="KEY", default="protein_expression",
        help="obsm key of the protein counts (default: protein_expression)")
    add("--batch-key", metavar="KEY", default=None,
        help="obs column of the batches; default: none, one batch (with --demo: batch)")
    add("--layer", metavar="LAYER", default=None, help="layer that holds the RNA counts (default: X)")
    add("--n-genes", metavar="N", type=_positive(1), default=None,
        help="keep the N most detected genes; the written .h5ad holds only those (default: all "
             "genes)")
    add("--max-epochs", metavar="N", type=_positive(1), default=None,
        help="most epochs to train; early stopping may end sooner (default: scvi-tools' rule, "
             "400 for 20,000 cells or fewer, fewer for more cells)")
    add("--n-steps-kl-warmup", metavar="N", type=_positive(0), default=None,
        help="steps over which the KL weight rises from 0 to 1 (default: 0.75 x the number of "
             "cells)")
    add("--protein-mixture", choices=["marginal", "enumerate"], default="marginal",
        help="sum the background/foreground indicator out analytically (marginal) or by Pyro's "
             "enumeration (default: marginal)")
    add("--n-cells", metavar="N", type=_positive(2), default=3000,
        help="cells simulated by --demo (default: 3000)")
    add("--seed", metavar="SEED", type=int, default=0,
        help="seed of the split, the initial weights and every draw: same seed, same result "
             "(default: 0)")
    add("--threads", metavar="N", type=_positive(1), default=None, help="torch CPU threads (default: "
        "torch's choice)")
    add("--batch-size", metavar="N", type=_positive(2), default=256, help="minibatch size, per process with "
        "--distributed (default: 256)")
    add("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"],
        help="where to train: auto is a CUDA GPU if torch sees one, else the CPU (default: auto)")
    add("--device", metavar="DEVICE", default="auto", help="GPU index or name such as cuda:1 (default: auto)")
    add("--distributed", action="store_true", help="data-parallel over the processes started "
        "by torchrun (torchrun --nproc-per-node N -m pyro_totalvi train ... --distributed); only "
        "rank 0 prints and writes --out (default: off)")
    add("--debug", action="store_true", help="on an error, show the Python traceback instead "
        "of one line (default: off)")
    return parser


def _check_paths(args) -> None:
    """Mistakes that need no data: an input that cannot be an .h5ad, an --out that is a file."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandLineError(f"--out {out} is an existing file; give a directory (it is "
                               "created if missing)")
    if args.input is None:
        return
    path = Path(args.input)
    if not path.exists():
        raise CommandLineError(f"{path}: no such file; give the path of an .h5ad file, or "
                               "--demo to train on simulated data")
    if path.is_dir():
        raise CommandLineError(f"{path} is a directory; give the path of an .h5ad file")


def _read_input(path: str):
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many kinds for a file that is not one
        raise CommandLineError(
            f"{path} cannot be read as an .h5ad file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); give an AnnData file "
            "written by anndata's write_h5ad (convert other formats with anndata or scanpy "
            "first)") from err


def _check_keys(adata, args, batch_key) -> None:
    """The keys given on the command line exist in the file (named by their option)."""
    for option, key, where, name in (
            ("--protein-key", args.protein_key, adata.obsm, "obsm"),
            ("--batch-key", batch_key, adata.obs, "obs"),
            ("--layer", args.layer, adata.layers, "layers")):
        if key is not None and key not in where:
            have = ", ".join(map(str, list(where.keys())[:20])) or "nothing"
            raise CommandLineError(f"{option} {key!r} is not in the file's {name} (it has: "
                                   f"{have}); pass one of those")


def _load_data(args, say):
    """The AnnData to train on, registered; raises CommandLineError on a user mistake."""
    from . import TOTALVI, simulate
    from .data import TotalVIDataError

    if args.demo:
        adata = simulate(args.n_cells, n_genes=1000, n_proteins=20, n_batches=2, seed=args.seed)
        batch_key = args.batch_key or "batch"
        say(f"simulated {adata.n_obs} cells x {adata.n_vars} genes x 20 proteins, 2 batches")
    else:
        adata = _read_input(args.input)
        batch_key = args.batch_key
        say(f"read {args.input}: {adata.n_obs} cells x {adata.n_vars} genes")
    _check_keys(adata, args, batch_key)
    n_before = adata.n_vars
    adata = _select_genes(adata, args.n_genes)
    if adata.n_vars < n_before:
        say(f"--n-genes: kept the {adata.n_vars} most detected of {n_before} genes (the written "
            ".h5ad holds only those)")
    try:
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key=args.protein_key,
                              batch_key=batch_key, layer=args.layer)
    except (TotalVIDataError, KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise CommandLineError(f"the data cannot be used: {message}") from err
    return adata


def _report_proteins(model, say) -> None:
    measured = model.data.protein_measured  # batches x proteins
    n = measured.shape[1]
    if measured.all():
        say(f"proteins: all {n} used in every batch")
        return
    parts = [f"{int((~row).sum())} in batch {b!r}"
             for b, row in zip(model.registry["batch_categories"], measured) if not row.all()]
    say(f"proteins: {n} used; treated as not measured (masked out of the likelihood): "
        + ", ".join(parts) + " (names in the warnings above)")


def _report_training(model, args, say) -> None:
    """How training ended: early stopping, the best epoch, an unfinished KL warm-up."""
    from .train import TrainingPlan, default_max_epochs

    h = model.history
    planned = args.max_epochs or default_max_epochs(model.adata.n_obs)
    monitor = "elbo_validation" if "elbo_validation" in h else "elbo_train"
    best = int(h[monitor].idxmin())
    if len(h) < planned:
        say(f"early stopping ended training at epoch {len(h)} of {planned} (the {monitor} had "
            f"not improved for {TrainingPlan.early_stopping_patience} epochs); best epoch "
            f"{best + 1}")
    else:
        say(f"trained all {planned} epochs; best {monitor} at epoch {best + 1}")
    if h["kl_weight"].iloc[-1] < 1.0:
        say("the KL warm-up had not finished (see the warning above): train longer with "
            "--max-epochs, or shorten it with --n-steps-kl-warmup")


def _write(model, adata, out: Path, say) -> None:
    adata.obsm["X_totalvi"] = model.get_latent_representation()
    out.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out / "adata_totalvi.h5ad")
    model.history.to_csv(out / "history.csv")
    _plot_history(model.history, out / "elbo.png")
    model.save(out / "model", overwrite=True)
    say(f"wrote {out}/adata_totalvi.h5ad (obsm['X_totalvi']), history.csv, elbo.png, model/")


def _train(parser, args) -> int:
    if args.demo == bool(args.input):
        parser.error("give either INPUT.h5ad or --demo")
    _check_paths(args)  # before the slow imports: a wrong path is answered at once

    import torch

    from . import TOTALVI
    from . import distributed as ddp

    try:
        created_group = ddp.init_distributed() if args.distributed else False
    except ddp.DistributedSetupError as err:
        parser.error(f"--distributed: {err}")
    main_process = ddp.is_main_process() if args.distributed else True
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        handlers=[handler])
    say = print if main_process else (lambda *_args, **_kwargs: None)  # only rank 0 talks

    if args.threads:
        torch.set_num_threads(args.threads)
    adata = _load_data(args, say)
    model = TOTALVI(adata, protein_mixture=args.protein_mixture)
    _report_proteins(model, say)
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, seed=args.seed, batch_size=args.batch_size,
                strategy="ddp" if args.distributed else None, progress_bar=main_process,
                accelerator=args.accelerator, device=args.device,
                n_steps_kl_warmup=args.n_steps_kl_warmup)
    seconds = time.perf_counter() - start
    if args.distributed:
        say(f"data-parallel over {ddp.get_world_size()} processes ({args.batch_size} cells "
            "each per step)")
        if created_group:
            torch.distributed.destroy_process_group()
        if not main_process:
            return 0  # every process holds the same model; rank 0 writes it
    h = model.history
    say(f"trained {len(h)} epochs on {model.device} in {seconds:.1f} s "
        f"({len(h) * len(model.split['train']) / seconds:.0f} training cells/s)")
    _report_training(model, args, say)
    say(f"final negative ELBO per cell: train {h['elbo_train'].iloc[-1]:.1f}, "
        f"validation {h.get('elbo_validation', h['elbo_train']).iloc[-1]:.1f}")
    _write(model, adata, Path(args.out), say)
    return 0


class _Formatter(logging.Formatter):
    """Plain messages; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a mistake in the command or its data prints one line naming it
    and what to do, and returns 2 (``--debug``: raises with the traceback instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _train(parser, args)
    except CommandLineError as err:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from .train import TrainingDivergedError  # imported here: torch is slow to import

        if args.debug or not isinstance(err, TrainingDivergedError):
            raise
        print(f"{PROG} {args.command}: error: training diverged: {err}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
