"""Peak extra memory and time of selection at two pool sizes: it must grow linearly in N.

    OPENBLAS_NUM_THREADS=1 python bench/selection_memory.py        # N = 10,000, 100,000; E = 512
    OPENBLAS_NUM_THREADS=1 python bench/selection_memory.py --sizes 2000 20000 --k 200

One BLAS thread is what a Ray task gets by default (OMP_NUM_THREADS = its num_cpus); on a
shared, oversubscribed machine a multi-threaded OpenBLAS matrix-vector product in the greedy
loop ran ~10x slower than a single thread.

Inputs (float32 embeddings, labelled embeddings, probabilities) are built before measuring;
"extra" is tracemalloc's peak above what was allocated when the call started (numpy reports
its buffers to tracemalloc; BLAS's own small work buffers are not counted). BADGE runs on the
same [N, E] table as its gradient embeddings: its working memory does not depend on the width.
An N×N float64 matrix would be 80 GB at N = 100,000; the per-row cost printed here is what
linear looks like.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from orchestrator.al.strategies import Candidates, make_strategy, select

N_CLASSES = 10


def measure(name: str, candidates: Candidates, k: int, seed: int) -> tuple[int, float]:
    """(peak bytes allocated above the starting point, seconds) for one selection."""
    strategy = make_strategy(name)
    tracemalloc.start()
    try:
        start_bytes, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        positions = select(strategy, candidates, k, np.random.default_rng(seed))
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(positions) == k
    return peak - start_bytes, seconds


def pool(n: int, dim: int, n_labelled: int, seed: int) -> Candidates:
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n, dim), dtype=np.float32)
    logits = rng.standard_normal((n, N_CLASSES), dtype=np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Candidates(
        rows=np.arange(n),
        outputs={"embeddings": embeddings, "grad_embeddings": embeddings, "probs": probs,
                 # two-stream's unsupervised stream: autoencoder codes, 32 wide
                 "ae_embeddings": embeddings[:, :32]},
        labelled={"embeddings": rng.standard_normal((n_labelled, dim), dtype=np.float32)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labelled", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=1_000)
    parser.add_argument("--strategies", nargs="+", default=["entropy", "coreset", "badge", "two_stream"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    small, large = sorted(args.sizes)
    print(f"E={args.dim} float32, labelled={args.labelled}, k={args.k}, C={N_CLASSES}")
    print(f"{'strategy':<10} {'N':>8} {'input MiB':>10} {'peak extra MiB':>15} "
          f"{'B/row':>7} {'seconds':>8}")
    results: dict[str, dict[int, int]] = {}
    for n in (small, large):
        candidates = pool(n, args.dim, args.labelled, args.seed)
        arrays = {id(a): a for a in (*candidates.outputs.values(), *candidates.labelled.values())}
        input_mib = sum(a.nbytes for a in arrays.values()) / 2**20
        for name in args.strategies:
            peak, seconds = measure(name, candidates, args.k, args.seed)
            results.setdefault(name, {})[n] = peak
            print(f"{name:<10} {n:>8,} {input_mib:>10.1f} {peak / 2**20:>15.2f} "
                  f"{peak / n:>7.1f} {seconds:>8.2f}")
        del candidates
    print(f"\nN grows {large / small:.0f}x:")
    print(f"{'strategy':<10} {'peak ratio':>10} {'B per added row':>16}")
    for name, peaks in results.items():
        ratio = peaks[large] / peaks[small]
        per_row = (peaks[large] - peaks[small]) / (large - small)
        print(f"{name:<10} {ratio:>10.2f} {per_row:>16.1f}")


if __name__ == "__main__":
    main()
