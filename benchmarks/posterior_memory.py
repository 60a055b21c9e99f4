"""Peak memory of get_normalized_expression on simulated data (one configuration per process).

    python benchmarks/posterior_memory.py --n-cells 20000 --n-genes 2000 --n-samples 50

Prints one JSON line: peak RSS of the whole process, RSS before the call, and the growth during the
call (which is what the chunked running means bound). The model is not trained: memory does not
depend on the parameter values.

For comparisons between runs, fix glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=1048576``):
otherwise malloc raises it as large blocks are freed, freed tensors may stay in the heap, and the
growth then depends on how many blocks were freed, not on the peak of live memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from _proc import reset_peak, status_mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-proteins", type=int, default=30)
    p.add_argument("--n-samples", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pyro_totalvi import TOTALVI, simulate

    adata = simulate(args.n_cells, args.n_genes, args.n_proteins, n_batches=2, seed=0)
    TOTALVI.setup_anndata(adata, batch_key="batch")
    model = TOTALVI(adata, empirical_protein_background_prior=False)
    model.module.eval()
    model.get_normalized_expression(indices=range(10))  # warm up allocator and code paths
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    rna, pro = model.get_normalized_expression(n_samples=args.n_samples, return_numpy=True)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "n_cells": args.n_cells, "n_genes": args.n_genes, "n_samples": args.n_samples,
        "output_mb": round((rna.nbytes + pro.nbytes) / 2**20, 1),
        "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - before, 1), "seconds": round(seconds, 2),
        "process_lifetime_peak_mb": round(lifetime_peak, 1),
    }))


if __name__ == "__main__":
    main()
