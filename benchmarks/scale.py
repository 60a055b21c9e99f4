"""A million cells on one machine: write, train one epoch from disk, embed and denoise everything.

    python benchmarks/scale.py --n-cells 1000000 --out /tmp/scale1m.h5ad

1. Writes an ``n_cells x 2,000 genes x 30 proteins`` simulated CITE-seq ``.h5ad`` chunk by chunk
   (``pyro_totalvi.simulate_chunks``): RNA is appended to the CSR datasets on disk, never held
   whole, never dense.
2. Opens it with ``anndata.read_h5ad(path, backed="r")`` and trains one epoch: minibatches are
   read from the file (``TOTALVI(..., backed=True)`` is implicit for backed AnnData).
3. Runs ``get_latent_representation`` over all cells and ``get_normalized_expression`` over all
   cells in blocks of cells whose results are reduced to per-gene means (an 8 GB dense result is
   what a user would write to disk, not keep).

Prints one JSON line with seconds, cells/s and peak RSS (VmHWM) of each phase.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _proc import reset_peak, status_mb


def write_h5ad(path: Path, n_cells: int, n_genes: int, n_proteins: int, chunk: int) -> None:
    """Stream simulated chunks into an .h5ad: X appended on disk, small fields at the end."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    from pyro_totalvi.simulate import simulate_chunks

    proteins = np.zeros((n_cells, n_proteins), np.float32)
    batch, names, var = [], [], None
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": (n_cells, n_genes)})
        data = g.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 20,))
        indices = g.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        for part in simulate_chunks(n_cells, n_genes, n_proteins, n_batches=2, seed=0,
                                    chunk_size=chunk):
            x = part.X
            start = int(indptr[-1][-1])
            data.resize((start + x.nnz,))
            indices.resize((start + x.nnz,))
            data[start:] = x.data
            indices[start:] = x.indices
            indptr.append(x.indptr[1:].astype(np.int64) + start)
            lo = len(names)
            proteins[lo : lo + part.n_obs] = part.obsm["protein_expression"].to_numpy()
            batch.append(part.obs["batch"].to_numpy())
            names.extend(part.obs_names)
            var = part.var
        g.create_dataset("indptr", data=np.concatenate(indptr))
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obs = pd.DataFrame({"batch": pd.Categorical(np.concatenate(batch))},
                           index=pd.Index(names))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "obsm", {"protein_expression": proteins})
        for key in ("layers", "obsp", "varm", "varp", "uns"):
            write_elem(f, key, {})
    ad.read_h5ad(path, backed="r").file.close()  # the file is a valid h5ad


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-proteins", type=int, default=30)
    p.add_argument("--chunk", type=int, default=20000)
    p.add_argument("--out", default="/tmp/pyro_totalvi_scale.h5ad")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep an existing file at --out")
    args = p.parse_args()

    import anndata as ad
    import torch

    torch.set_num_threads(args.threads)
    from pyro_totalvi import TOTALVI

    out: dict = {"n_cells": args.n_cells, "n_genes": args.n_genes, "n_proteins": args.n_proteins}
    path = Path(args.out)
    if not (args.reuse and path.exists()):
        reset_peak()
        t = time.perf_counter()
        write_h5ad(path, args.n_cells, args.n_genes, args.n_proteins, args.chunk)
        out["write_s"] = round(time.perf_counter() - t, 1)
        out["write_peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    out["file_gb"] = round(path.stat().st_size / 2**30, 2)

    reset_peak()
    t = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r")
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                          batch_key="batch")
    model = TOTALVI(adata)
    out["setup_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    model.train(max_epochs=1, early_stopping=False)
    seconds = time.perf_counter() - t
    out["train_epoch_s"] = round(seconds, 1)
    out["train_cells_per_s"] = round(len(model.split["train"]) / seconds)
    out["train_peak_rss_mb"] = round(status_mb("VmHWM"), 1)

    reset_peak()
    t = time.perf_counter()
    latent = model.get_latent_representation(batch_size=4096)
    out["latent_s"] = round(time.perf_counter() - t, 1)
    out["latent_cells_per_s"] = round(args.n_cells / (time.perf_counter() - t))
    out["latent_peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    assert latent.shape == (args.n_cells, 20) and np.isfinite(latent).all()

    reset_peak()
    t = time.perf_counter()
    gene_sum = np.zeros(args.n_genes)
    block = 50_000
    for start in range(0, args.n_cells, block):
        rna, _ = model.get_normalized_expression(indices=np.arange(start, min(start + block,
                                                                              args.n_cells)),
                                                 return_numpy=True)
        gene_sum += rna.sum(0)
    out["normexpr_s"] = round(time.perf_counter() - t, 1)
    out["normexpr_cells_per_s"] = round(args.n_cells / (time.perf_counter() - t))
    out["normexpr_peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
