"""Shared fixtures: a local Ray for the tests that need one, tiny synthetic pools, a browser.

The tree mirrors the packages: tests/unit/<package>/ (one file per module, hand-computed
answers), tests/integration/ (campaigns end to end on a local Ray), tests/faults/ (processes
killed at fixed points, full and read-only disks). `pytest -m "not slow"` is the fast tier:
a test that starts Ray (the `ray_local` fixture, or `ray`-marked), a browser, or a subprocess
that runs a campaign, or takes more than a few seconds, is `slow`; the first two are marked so
here whatever their file says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.data.pool import PoolWriter
from orchestrator.distributed.connect import set_env_defaults

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots (git-ignored)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Ray Train polls slowly and watches for preemption by default: both only slow tests down
# (Ray Train's in-process mode reads them from this process).
set_env_defaults()


def pytest_collection_modifyitems(config, items):
    """Whatever starts Ray or a browser is slow: it is left out of `pytest -m "not slow"`."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("ray") or "ray_local" in fixtures:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)


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
    """A local Ray of 2 CPUs for the session, started as the commands start theirs."""
    import ray
    from ray.data import DataContext

    from orchestrator.distributed.connect import connect

    with connect("local", log_level="ERROR", num_cpus=2, include_dashboard=False):
        DataContext.get_current().enable_progress_bars = False
        yield ray


@pytest.fixture
def row_groups_read(monkeypatch):
    """Every Parquet row group read, as (shard file name, row group, columns); a whole-file
    read fails the test (what a read of some rows must not do)."""
    reads = []
    original_init, original_read = pq.ParquetFile.__init__, pq.ParquetFile.read_row_group

    def init(self, source, *args, **kwargs):
        self.shard_name = Path(str(source)).stem
        self.is_shard = Path(str(source)).parent.name == "shards"  # not a pass's score file
        original_init(self, source, *args, **kwargs)

    def read_row_group(self, group, columns=None, **kwargs):
        reads.append((self.shard_name, group, tuple(columns or ())))
        return original_read(self, group, columns=columns, **kwargs)

    def refusing(original):
        def refuse(self, *args, **kwargs):
            if getattr(self, "is_shard", True):
                raise AssertionError("a whole shard was read")
            return original(self, *args, **kwargs)
        return refuse

    monkeypatch.setattr(pq.ParquetFile, "__init__", init)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", refusing(pq.ParquetFile.iter_batches))
    monkeypatch.setattr(pq.ParquetFile, "read", refusing(pq.ParquetFile.read))
    return reads


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


def mapped_from(directory) -> list[str]:
    """This process's memory maps of files in `directory` (Linux's /proc/self/maps): how a
    test sees a volume cache, whose file has no name to list."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    return [line for line in maps.read_text().splitlines() if f" {directory}/" in line]


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
