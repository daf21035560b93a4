"""Forward (and training-step) throughput of the 3D ResNets on this machine, as a table.

    python bench/model_forward.py --threads 1   # ~2 min on 2 shared cores

For each model: GFLOP per 32³ volume (counted with torch.utils.flop_counter on the meta device:
convolutions and matmuls, 2 FLOPs per multiply-add), forward volumes/s and achieved GFLOP/s in
eval mode under inference_mode (fp32, and bf16 autocast), and training volumes/s of one
``train_epoch`` step (T forward+backward+SGD step, M's forward and EMA update). The last column
estimates one campaign's compute from those rates (assumptions printed below the table), to pick
a CPU default. The measured fp32 matmul rate is the machine's ceiling for comparison.

Expensive models are timed on fewer volumes than ``--batch`` so each cell costs about
``--budget-s`` seconds; the "batch" column says how many (per-volume throughput of the big
models depends little on it: one volume is already a large convolution). Each cell reports its
fastest call after a warm-up, so neighbours on a shared machine bias it less. Cells that would
take far longer are not timed: bf16 on a CPU without bf16 instructions (AVX2 only: ~15x slower
than fp32) only for models under ``--bf16-max-gflop`` per volume; and the training rate of
models too slow to step within a few budgets is estimated as forward/5 and marked "~" (timed
rows: a step costs 4-6 forwards; conv backward is slow on CPU).

On a shared machine use ``--threads 1``: with 2 threads on 2 busy cores, OpenMP barriers make
training steps 5-20x slower than the same step on 1 thread.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.nn.ema import init_mean_model
from orchestrator.nn.learning import make_optimizer, train_epoch
from orchestrator.nn.model import build_model

REQUIRED = [
    (name, width, stem)
    for name in ("resnet10", "resnet18")
    for width in (64, 32)
    for stem in ("small", "full")
]
# Smaller models that might fit a 10-minute CPU campaign.
CANDIDATES = [
    ("resnet10", 16, "full"),
    ("resnet18", 16, "full"),
    ("resnet_tiny", 32, "full"),
    ("resnet_tiny", 16, "small"),
    ("resnet_tiny", 8, "small"),
]


def matmul_gflops(n: int = 2048, reps: int = 3, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def flops_per_volume(name: str, width: int, stem: str, size: int) -> float:
    with torch.device("meta"):
        model = build_model(name, num_classes=10, width=width, stem=stem).eval()
        x = torch.empty(1, 1, size, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return float(counter.get_total_flops())


def _timed(fn, budget_s: float) -> float:
    """Seconds per call of fn(): one warm-up call (oneDNN builds its kernels per shape), then
    calls until budget_s has passed; the fastest call, since on a shared machine the slow ones
    measure the neighbours."""
    fn()
    best, t0 = math.inf, time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - t0 >= budget_s:
            return best


def forward_rate(model, size: int, b: int, budget_s: float, amp_dtype) -> float:
    """Volumes/s of eval-mode forward on a batch of b."""
    amp = contextlib.nullcontext()
    if amp_dtype is not None:
        amp = torch.autocast("cpu", dtype=amp_dtype)
    x = torch.randn(b, 1, size, size, size)
    with torch.inference_mode(), amp:
        return b / _timed(lambda: model(x), budget_s)


def train_rate(name, width, stem, size, b, budget_s) -> float:
    """Volumes/s of train_epoch steps on a batch of b (lam > 0, so M's forward is included)."""
    model = build_model(name, num_classes=10, width=width, stem=stem)
    mean = init_mean_model(model)
    opt = make_optimizer(model)
    data = [(torch.randn(b, 1, size, size, size), torch.randint(0, 10, (b,)))]

    def step():
        train_epoch(model, mean, data, opt, lam=0.03, distance="mse_logits", alpha=0.999)

    return b / _timed(step, budget_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32, help="volume edge in voxels")
    ap.add_argument("--batch", type=int, default=32, help="largest batch timed")
    ap.add_argument("--budget-s", type=float, default=1.0, help="seconds per timed cell")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--bf16-max-gflop", type=float, default=1.5,
                    help="time bf16 only for models below this many GFLOP per volume")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-candidates", action="store_true", help="only the required rows")
    # Campaign assumptions for the estimate column.
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--labelled", type=int, default=1000, help="mean labelled set size")
    ap.add_argument("--scored", type=int, default=2000, help="volumes scored per cycle")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    mm32 = matmul_gflops()
    mm16 = matmul_gflops(512, dtype=torch.bfloat16) if not args.no_bf16 else math.nan
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}³ volumes, 10 classes")
    print(f"matmul: fp32 2048x2048 {mm32:.1f} GFLOP/s, bf16 512x512 {mm16:.1f} GFLOP/s\n")

    rows = REQUIRED + ([] if args.no_candidates else CANDIDATES)
    header = (
        f"{'model':<12}{'width':>6}{'stem':>7}{'GFLOP/vol':>11}{'batch':>7}"
        f"{'fp32 vol/s':>12}{'GFLOP/s':>9}{'bf16 vol/s':>12}{'GFLOP/s':>9}"
        f"{'train vol/s':>13}{'campaign s':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, width, stem in rows:
        flops = flops_per_volume(name, width, stem, args.size)
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, width=width, stem=stem).eval()
        # Guess the time per volume from the matmul rate at 30% efficiency, to size the batch.
        guess_s = flops / (0.3 * mm32 * 1e9)
        b = max(1, min(args.batch, int(args.budget_s / guess_s)))
        fwd32 = forward_rate(model, args.size, b, args.budget_s, None)
        fwd16 = math.nan
        if not args.no_bf16 and flops / 1e9 < args.bf16_max_gflop:
            b16 = max(1, min(b, int(args.budget_s / (15 * guess_s))))  # bf16 ~15x slower on AVX2
            fwd16 = forward_rate(model, args.size, b16, args.budget_s, torch.bfloat16)
        trn, campaign, mark = math.nan, math.nan, " "
        if not args.no_train:
            # A training step costs ~5 forwards (T forward + backward ≈ 4, M forward 1).
            b_train = max(2, min(args.batch, int(args.budget_s * fwd32 / 5)))
            if b_train * 5 / fwd32 < 2 * args.budget_s:
                trn = train_rate(name, width, stem, args.size, b_train, args.budget_s)
            else:
                trn, mark = fwd32 / 5, "~"
            # Scoring runs T and M: two forwards per scored volume.
            campaign = args.cycles * (
                args.epochs * args.labelled / trn + args.scored / (fwd32 / 2)
            )
        print(
            f"{name:<12}{width:>6}{stem:>7}{flops / 1e9:>11.2f}{b:>7}"
            f"{fwd32:>12.1f}{fwd32 * flops / 1e9:>9.1f}{fwd16:>12.1f}{fwd16 * flops / 1e9:>9.1f}"
            f"{mark + format(trn, '.1f'):>13}{campaign:>12.0f}",
            flush=True,
        )
    print(
        f"\ncampaign s = {args.cycles} cycles x ({args.epochs} epochs x {args.labelled} labelled"
        f" / train vol/s + {args.scored} scored / (fp32 vol/s / 2)); compute only, no Ray"
        f" overhead, no evaluation. ~: estimated as fp32 vol/s / 5."
        f"\ntotal bench time {time.perf_counter() - t_start:.0f} s"
    )


if __name__ == "__main__":
    main()
