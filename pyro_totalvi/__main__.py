"""Command line: ``python -m pyro_totalvi train INPUT.h5ad --out DIR`` or ``... train --demo``.

Several processes: ``torchrun --nproc-per-node N -m pyro_totalvi train ... --distributed``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np


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


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``train`` and its options."""
    parser = argparse.ArgumentParser(prog="python -m pyro_totalvi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train totalVI and write results")
    tr.add_argument("input", nargs="?", help=".h5ad with RNA counts in X and proteins in obsm")
    tr.add_argument("--demo", action="store_true", help="train on data simulated by the package")
    tr.add_argument("--out", default="results", help="output directory (default: results/)")
    tr.add_argument("--protein-key", default="protein_expression")
    tr.add_argument("--batch-key", default=None)
    tr.add_argument("--layer", default=None)
    tr.add_argument("--n-genes", type=int, default=None, help="keep the N most detected genes")
    tr.add_argument("--max-epochs", type=int, default=None)
    tr.add_argument("--protein-mixture", choices=["marginal", "enumerate"], default="marginal")
    tr.add_argument("--n-cells", type=int, default=3000, help="cells simulated by --demo")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    tr.add_argument("--batch-size", type=int, default=256,
                    help="minibatch size (per process with --distributed; default 256)")
    tr.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"],
                    help="where to train: auto (a CUDA GPU if torch sees one, else CPU), cpu, gpu")
    tr.add_argument("--device", default="auto",
                    help="GPU index or name such as cuda:1 (default: auto)")
    tr.add_argument("--distributed", action="store_true",
                    help="data-parallel over the processes started by torchrun "
                         "(torchrun --nproc-per-node N -m pyro_totalvi train ... --distributed); "
                         "only rank 0 prints and writes --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    import anndata as ad
    import torch

    from . import TOTALVI, simulate
    from . import distributed as ddp

    if args.demo == bool(args.input):
        parser.error("give either INPUT.h5ad or --demo")
    try:
        created_group = ddp.init_distributed() if args.distributed else False
    except ddp.DistributedSetupError as err:
        parser.error(f"--distributed: {err}")
    main_process = ddp.is_main_process() if args.distributed else True
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(message)s")
    say = print if main_process else (lambda *_args, **_kwargs: None)  # only rank 0 talks

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        adata = simulate(args.n_cells, n_genes=1000, n_proteins=20, n_batches=2, seed=args.seed)
        batch_key = args.batch_key or "batch"
        say(f"simulated {adata.n_obs} cells x {adata.n_vars} genes x 20 proteins, 2 batches")
    else:
        adata = ad.read_h5ad(args.input)
        batch_key = args.batch_key
        say(f"read {args.input}: {adata.n_obs} cells x {adata.n_vars} genes")
    adata = _select_genes(adata, args.n_genes)
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key=args.protein_key,
                          batch_key=batch_key, layer=args.layer)
    model = TOTALVI(adata, protein_mixture=args.protein_mixture)
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, seed=args.seed, batch_size=args.batch_size,
                strategy="ddp" if args.distributed else None, progress_bar=main_process,
                accelerator=args.accelerator, device=args.device)
    seconds = time.perf_counter() - start
    if args.distributed:
        world = ddp.get_world_size()
        say(f"data-parallel over {world} processes ({args.batch_size} cells each per step)")
        if created_group:
            torch.distributed.destroy_process_group()
        if not main_process:
            return 0  # every process holds the same model; rank 0 writes it
    adata.obsm["X_totalvi"] = model.get_latent_representation()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out / "adata_totalvi.h5ad")
    model.history.to_csv(out / "history.csv")
    _plot_history(model.history, out / "elbo.png")
    model.save(out / "model", overwrite=True)
    h = model.history
    n_epochs = len(h)
    say(f"trained {n_epochs} epochs on {model.device} in {seconds:.1f} s "
          f"({n_epochs * len(model.split['train']) / seconds:.0f} training cells/s)")
    say(f"final negative ELBO per cell: train {h['elbo_train'].iloc[-1]:.1f}, "
          f"validation {h.get('elbo_validation', h['elbo_train']).iloc[-1]:.1f}")
    say(f"wrote {out}/adata_totalvi.h5ad (obsm['X_totalvi']), history.csv, elbo.png, model/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
