"""Shared fixtures: a local Ray for the tests that need one, and tiny synthetic pools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.pool import PoolWriter

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Ray Train polls slowly and watches for preemption by default: both only slow tests down.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying why."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}: the shared data folder beside the project is absent")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on a shared, loaded CPU: OpenMP barriers cost more than the work (3x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    import ray
    from ray.data import DataContext

    ray.init(
        address="local", num_cpus=2, include_dashboard=False,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env={"env_vars": {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }},
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def shape_volume(kind: int, box: int, rng: np.random.Generator, noise: float = 0.3) -> np.ndarray:
    """Three easily told apart shapes (ball, slab, rod) with a random shift and noise."""
    z, y, x = np.mgrid[:box, :box, :box] - box / 2 + rng.uniform(-1.5, 1.5, size=3)[:, None, None, None]
    if kind == 0:
        volume = (x**2 + y**2 + z**2 < (box / 4) ** 2)
    elif kind == 1:
        volume = (np.abs(z) < box / 8) & (np.abs(x) < box / 3) & (np.abs(y) < box / 3)
    else:
        volume = (x**2 + y**2 < (box / 8) ** 2) & (np.abs(z) < box / 2.5)
    return volume.astype(np.float32) + noise * rng.normal(size=(box, box, box)).astype(np.float32)


def make_shape_pool(path: Path, *, n_train=60, n_val=12, n_test=12, box=16, seed=0, shard_mb=0.05):
    rng = np.random.default_rng(seed)
    with PoolWriter(path, box, class_names=["ball", "slab", "rod"], shard_mb=shard_mb) as writer:
        for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(count):
                label = i % 3
                writer.add(f"{split}-{i:04d}", shape_volume(label, box, rng), source="synthetic",
                           label=label, split=split)
    return writer.close()


@pytest.fixture(scope="session")
def shape_pool(tmp_path_factory):
    return make_shape_pool(tmp_path_factory.mktemp("pools") / "shapes")


def finished_run(run_dir: Path, pool: Path, pred: list[int], prob: list[float]) -> Path:
    """A run directory as a finished campaign leaves it, with what an export reads: state.json
    naming the pool, and predictions.parquet (pool rows 0.. in order)."""
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"pool": str(pool), "done": True}))
    rows = list(range(len(pred)))
    pq.write_table(pa.table({"row": rows, "pred": pred, "pred_prob": prob}), run_dir / "predictions.parquet")
    return run_dir


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's) driven by Playwright, for the pages people open."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright "
                                   "(pip install -e '.[test]')")
    if not CHROMIUM.exists():
        pytest.skip(f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
