"""Scoring throughput on a GPU: the EMA-KL pass (T and M forward, the scorer's channels-last
layout) in fp32 and bf16, for the CPU default network and the paper's, at several batch sizes.

Two figures per cell: "compute" feeds a batch already on the GPU (the ceiling), "pool" reads
the volumes from a Parquet pool through `iter_volumes` as a scoring pass does (read, copy to
the GPU, forward, scores back to the host). Raw rows go to --results (CSV), the table is
printed. Needs CUDA; bench/gpu.sh runs it on the device machine.

    python bench/gpu_scoring.py --rows 20000
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import forward_gflop, make_noise_pool, save_models  # noqa: E402
from orchestrator.al.strategies import make_strategy  # noqa: E402
from orchestrator.data.pool import iter_volumes  # noqa: E402
from orchestrator.nn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from orchestrator.nn.outputs import forward_outputs  # noqa: E402

MODELS = {"resnet10 w16 (CPU default)": ("resnet10", 16), "resnet18 w64 (paper)": ("resnet18", 64)}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
COLUMNS = ["model", "precision", "batch", "source", "subtomograms_per_s", "gflop_per_s"]


def rate(nets, batches, amp_dtype, device) -> float:
    """Subtomograms/s of the EMA-KL scores over ``batches`` (after one warm-up batch)."""
    strategy = make_strategy("ema_kl")
    batches = iter(batches)
    strategy.score(forward_outputs(nets[0], nets[1], next(batches), strategy.needs, amp_dtype=amp_dtype))
    torch.cuda.synchronize(device)
    started, n = time.perf_counter(), 0
    for x in batches:
        strategy.score(forward_outputs(nets[0], nets[1], x, strategy.needs, amp_dtype=amp_dtype))
        n += len(x)
    torch.cuda.synchronize(device)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="pool rows (the 'pool' figure)")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--results", type=Path, default=Path("runs/bench/gpu_scoring.csv"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_scoring.py needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_noise_pool(Path(tmp) / "pool", args.rows).path
        for label, (name, width) in MODELS.items():
            gflop = 2 * forward_gflop(save_models(Path(tmp) / "model.pt", name, width, "full"), 32)
            saved = load_checkpoint(Path(tmp) / "model.pt", device)
            nets = [model_from_checkpoint(saved, key, device, channels_last=True) for key in ("model", "mean")]
            for precision, amp_dtype in PRECISIONS.items():
                for batch in args.batches:
                    resident = torch.randn(batch, 1, 32, 32, 32, device=device)
                    repeats = max(4, 8192 // batch)
                    sources = {"compute": (resident for _ in range(repeats + 1)),
                               "pool": (torch.from_numpy(v) for _, v, _ in iter_volumes(pool, batch_rows=batch))}
                    for source, batches in sources.items():
                        r = rate(nets, batches, amp_dtype, device)
                        rows.append([label, precision, batch, source, round(r), round(r * gflop)])
                        print(f"| {label} | {precision} | {batch} | {source} | {r:,.0f} | {r * gflop:,.0f} |",
                              flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    print(f"\n{torch.cuda.get_device_name(device)}; GFLOP/s counts T and M forwards; raw rows in {args.results}")


if __name__ == "__main__":
    main()
