"""Scoring the unlabelled pool on Ray Data. The one module importing ray.data.

The pool's Parquet shards are read in parallel, an actor pool holding T and M maps each batch
to per-row scores (`actors/scorer.py`), and the scores are written to Parquet. Only ids and
scores reach the driver; memory stays flat as the pool grows. The output directory appears
whole or not at all (written under a temporary name, then renamed), so a scoring pass cut
short by a crash is simply run again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import ray
import ray.data

from actors.scorer import PoolScorer
from orchestrator.config import ScoreConfig
from orchestrator.pool import open_pool


def score_pool(
    pool_path: str,
    model_path: str,
    out_dir: str | Path,
    *,
    strategy: str,
    strategy_options: dict,
    exclude_rows: Sequence[int] = (),
    cfg: ScoreConfig = ScoreConfig(),
    seed: int = 0,
) -> Path:
    """Score every pool row not in `exclude_rows`; returns the Parquet directory written."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    info = open_pool(pool_path)
    dataset = ray.data.read_parquet(
        info.shard_paths,
        # at least two blocks per actor, or a pool of few shards keeps all but one actor idle
        override_num_blocks=max(len(info.shards), 2 * cfg.actors),
    ).select_columns(["row", "subtomo_id", "volume"])
    scored = dataset.map_batches(
        PoolScorer,
        fn_constructor_kwargs={
            "model_path": str(Path(model_path).resolve()),
            "pool_path": str(Path(pool_path).resolve()),
            "strategy": strategy,
            "strategy_options": dict(strategy_options),
            "exclude_rows": ray.put(np.asarray(exclude_rows, dtype=np.int64)),
            "threads": max(1, int(cfg.cpus_per_actor)),
            "use_gpu": cfg.gpus_per_actor > 0,
            "seed": seed,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    scored.write_parquet(str(partial.resolve()))
    partial.rename(out_dir)
    return out_dir


def read_scores(scores_dir: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The scores written by `score_pool` (only the asked columns), sorted by pool row."""
    files = sorted(Path(scores_dir).glob("*.parquet"))
    tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.int64()) for c in (columns or ["row"])})
    table = pa.concat_tables(tables)
    return table.sort_by("row")


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy; tensor columns (probabilities, embeddings) come back [N, …]."""
    column = table.column(name).combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):
        return column.to_numpy_ndarray()
    if hasattr(column.type, "storage_type"):
        return column.to_numpy()
    return column.to_numpy(zero_copy_only=False)
