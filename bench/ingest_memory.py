"""Peak memory of ingesting a pool and of streaming it back, against the pool's size.

    python bench/ingest_memory.py [--n 10000] [--box 32] [--source folder|npy] [--dtype float16]

Generates N random box³ subtomograms in a temp folder (a folder of MRC files, or one .npy),
ingests them with orchestrator.data.ingest, then reads the pool back whole with iter_volumes. Each
phase runs in its own fresh Python process so its peak resident memory (VmHWM from
/proc/self/status, which counts mapped file pages too) is its own. The point: peak memory stays
far below the pool's size, because both directions stream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def generate(source: str, workdir: Path, n: int, box: int) -> Path:
    """Write n random volumes in chunks, so the generator never holds them all either."""
    rng = np.random.default_rng(0)
    chunk = 500
    if source == "npy":
        path = workdir / "subtomos.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, box, box, box))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            out[start:stop] = rng.normal(size=(stop - start, box, box, box)).astype(np.float32)
        out.flush()
        del out
        return path
    from orchestrator.data.volumes import write_volume

    folder = workdir / "subtomos"
    for start in range(0, n, chunk):
        sub = folder / f"tomo{start // chunk:03d}"
        sub.mkdir(parents=True)
        block = rng.normal(size=(min(n, start + chunk) - start, box, box, box)).astype(np.float32)
        for i, vol in enumerate(block):
            write_volume(sub / f"p{start + i:06d}.mrc", vol, 10.0)
    return folder


def phase_ingest(source: str, pool: str, dtype: str) -> dict:
    from orchestrator.data.ingest import ingest

    baseline = peak_rss_bytes()
    started = time.perf_counter()
    report = ingest(source, pool, dtype=dtype, progress_every=10**9, progress_seconds=10**9)
    return {
        "seconds": time.perf_counter() - started, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
        "accepted": report.accepted, "rejected": report.rejected,
    }


def phase_read(pool: str) -> dict:
    from orchestrator.data.pool import iter_volumes

    baseline = peak_rss_bytes()
    started = time.perf_counter()
    rows, total = 0, 0.0
    for ids, volumes, _ in iter_volumes(pool, batch_rows=256):
        rows += len(ids)
        total += float(volumes.sum(dtype=np.float64))  # touch every voxel
    return {
        "seconds": time.perf_counter() - started, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
        "rows": rows, "checksum": total,
    }


def run_phase(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        [sys.executable, __file__, "--phase", *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--source", choices=("folder", "npy"), default="folder")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--workdir", help="where to generate (default: a temp folder, removed after)")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        name, *rest = args.phase
        result = phase_ingest(*rest) if name == "ingest" else phase_read(*rest)
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cryoal-bench-"))
    try:
        started = time.perf_counter()
        source = generate(args.source, workdir, args.n, args.box)
        generated = time.perf_counter() - started
        pool = workdir / "pool"
        ingested = run_phase("ingest", str(source), str(pool), args.dtype)
        read = run_phase("read", str(pool))
        assert ingested["accepted"] == args.n == read["rows"], (ingested, read)
        raw = args.n * args.box**3 * 4
        on_disk = folder_bytes(pool)
        rows = [
            ("subtomograms", f"{args.n} x {args.box}^3 from a {args.source} ({folder_bytes(workdir) - on_disk:,.0f} B source, made in {generated:.1f} s)"),
            ("raw volume bytes (float32)", f"{raw / MB:,.1f} MB"),
            (f"pool size on disk ({args.dtype})", f"{on_disk / MB:,.1f} MB"),
            ("peak RSS, ingest", f"{ingested['peak_rss'] / MB:,.1f} MB (after imports: {ingested['baseline_rss'] / MB:,.1f} MB)"),
            ("peak RSS, read-back (iter_volumes, 256 rows a batch)", f"{read['peak_rss'] / MB:,.1f} MB (after imports: {read['baseline_rss'] / MB:,.1f} MB)"),
            ("ingest time", f"{ingested['seconds']:.1f} s ({args.n / ingested['seconds']:,.0f} subtomograms/s)"),
            ("read-back time", f"{read['seconds']:.1f} s ({args.n / read['seconds']:,.0f} subtomograms/s)"),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"| {'measure':<{width}} | value |")
        print(f"| {'-' * width} | ----- |")
        for key, value in rows:
            print(f"| {key:<{width}} | {value} |")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
