"""Scoring the unlabelled pool on Ray Data. The one module importing ray.data.

The pool's Parquet shards are read in parallel, scoring workers holding T and M map each batch
to per-row scores (`actors/scorer.py`), and the scores are written to Parquet. For a small
pass (`score.warm_below_rows`: a person's cycle on a workstation) the workers are Ray tasks
whose processes outlive the pass with their scorer loaded, so only the first such pass of a
campaign pays for starting them; a large pass gets an actor pool started for it, which Ray
Data keeps busier (~1.5× the rate here), so that its start-up is small against the pass.
Rows the pass skips (held out, labelled) are filtered in the read: a row group that holds none
of the rows scored is not read, and the skipped rows of the others never reach a worker. Only ids and
scores reach the driver; memory stays flat as the pool grows. The output directory appears
whole or not at all (written under a temporary name, then renamed), so a scoring pass cut
short by a crash is simply run again.

`score.actors = 0` scores in the calling process instead (the same actor class and output
files, no Ray Data): on a small machine a Ray Data pass that starts its workers spends
8–40 s on it for a job of seconds, which dominates small campaigns, sweeps of them and
benchmarks.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import ray
import ray.data
from ray.data.expressions import col

from actors.describer import PoolDescriber, describe_batch
from actors.scorer import PoolScorer, score_batch
from orchestrator.al.cold_start import BATCH_ROWS
from orchestrator import faults
from orchestrator.config import ScoreConfig
from orchestrator.data.pool import PoolInfo, iter_batches, iter_rows, open_pool, row_group_index, shard_locations
from orchestrator.data.storage import absolute
from orchestrator.distributed.events import partial_dir

SCORED_COLUMNS = ["row", "subtomo_id", "volume"]
DESCRIBED_COLUMNS = ["row", "volume"]
SCORING_WORKER_ENV = "CRYOAL_SCORING_WORKER"  # set in the warm scoring workers only
# The scan filter names skipped rows as ranges when they form at most FEW_RUNS runs, else only
# the runs of at least LONG_RUN rows (a 1 MB row group of 32³ float16 volumes)
FEW_RUNS, LONG_RUN = 64, 16
# A description of fewer rows runs in this process. It costs 1.1-1.7 ms a 32³ volume a core;
# Ray Data adds ~5 s to start its workers and, on a 2-CPU Ray, does not run both at once (1.6-2.0
# ms a row, the same features to the bit): it pays off with a cluster's CPUs, for large pools
# (docs/BENCHMARKS.md, "The cold start's description")
DESCRIBE_IN_PROCESS_BELOW = 5000
ROW_OVERHEAD_BYTES = 256  # a row's id, source and numbers beside its volume, at most (for block sizes)
PROGRESS_FILES = 50  # a pass's score files, when `score.rows_per_file` does not make them fewer


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
    partial = partial_dir(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    faults.maybe_fault("score-started")
    scorer_kwargs = {
        "model_path": str(Path(model_path).resolve()),
        "pool_path": absolute(pool_path),  # a URI stays one
        "strategy": strategy,
        "strategy_options": dict(strategy_options),
        "threads": max(1, int(cfg.cpus_per_actor)),
        "use_gpu": cfg.gpus_per_actor > 0,
        "seed": seed,
    }
    info = open_pool(pool_path)
    rows = rows_to_score(info, exclude_rows)
    file_rows = rows_per_file(info.n_rows if rows is None else len(rows), cfg)
    if rows is not None and not len(rows):  # nothing left to score: an empty pass
        partial.mkdir(parents=True)
    elif cfg.actors == 0:  # the caller's own thread setting stays as it is
        scorer = PoolScorer(**{**scorer_kwargs, "threads": torch.get_num_threads()})
        _score_in_process(pool_path, scorer, partial, cfg.batch_size, rows, file_rows)
    else:
        _score_on_ray_data(pool_path, scorer_kwargs, rows, partial, cfg, file_rows)
    partial.rename(out_dir)
    return out_dir


def rows_to_score(info: PoolInfo, exclude_rows: Sequence[int]) -> np.ndarray | None:
    """The pool rows a pass scores, sorted: every row but `exclude_rows`; None when nothing is
    excluded (the pass then reads the pool as it is stored, with no filter)."""
    exclude = np.unique(np.asarray(exclude_rows, dtype=np.int64))
    if not len(exclude):
        return None
    return np.setdiff1d(row_group_index(info).rows(), exclude, assume_unique=True)


def rows_per_file(n_rows: int, cfg: ScoreConfig) -> int:
    """Rows of each score file of a pass of `n_rows`: `score.rows_per_file` at most, so that a
    large pass writes few files (the driver reads them back one by one); ~PROGRESS_FILES files
    for a smaller pass (the stage's progress counts finished files); never less than a batch."""
    return max(cfg.batch_size, min(cfg.rows_per_file, n_rows // PROGRESS_FILES))


def _score_on_ray_data(pool_path: str, scorer_kwargs: dict, rows: np.ndarray | None,
                       partial: Path, cfg: ScoreConfig, file_rows: int) -> None:
    info = open_pool(pool_path)
    scored = _read_rows(pool_path, rows, SCORED_COLUMNS, cfg).map_batches(
        **scoring_udf(scorer_kwargs, cfg, len(rows) if rows is not None else info.n_rows),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        **actor_resources(cfg),
    )
    _write_files(scored, partial, file_rows)


def _read_rows(pool_path: str, rows: np.ndarray | None, columns: list[str], cfg: ScoreConfig):
    """A Ray Dataset of the pool's `rows` (None: every row), in blocks of about a batch."""
    info = open_pool(pool_path)
    filesystem, shards = shard_locations(info)  # (None, paths) for a local pool
    context = ray.data.DataContext.get_current()
    limit_buffer(context, cfg.buffer_mb)
    batch_blocks(context, cfg.batch_size, info)
    dataset = ray.data.read_parquet(
        shards, filesystem=filesystem,
        # at least two blocks per actor, or a pool of few shards keeps all but one actor idle
        override_num_blocks=max(len(info.shards), 2 * cfg.actors),
    ).select_columns(columns)
    if rows is not None:
        # Ray Data pushes the filter into the Parquet scan: row groups whose `row` statistics
        # hold no scored row are skipped, the rest filtered as they are read, so skipped rows
        # are never decoded nor sent to an actor (a filter that stayed a step after the read
        # would give the same rows).
        keep = scored_rows_filter(rows, row_group_index(info).rows())
        dataset = dataset if keep is None else dataset.filter(expr=keep)
    return dataset


def batch_blocks(context: ray.data.DataContext, batch_size: int, info: PoolInfo) -> None:
    """Have the read cut its blocks at about a batch of volumes. A shard (256 MB) is read by one
    task as one stream of blocks; blocks of Ray Data's default 128 MB would feed one actor while
    the others wait on a pool of few shards. A streaming repartition after the read did the
    same, in a worker of its own that copied every block once more: without it a 100,000-row
    pass ran 16% faster and its memory stayed flat from 10,000 rows (1.02× against 1.14×;
    docs/BENCHMARKS.md, "Blocks cut by the read")."""
    row_bytes = info.voxels * np.dtype(info.dtype).itemsize + ROW_OVERHEAD_BYTES
    context.target_max_block_size = batch_size * row_bytes


def _write_files(dataset, partial: Path, file_rows: int) -> None:
    # Batches are bundled into files of `file_rows`. The bundling write is a task of its own:
    # with the CPUs' default reservation it waits for CPUs the scoring actors hold, and every
    # file is written at the end of the pass; it takes next to no CPU, so it reserves none.
    dataset.write_parquet(str(partial.resolve()), min_rows_per_file=file_rows,
                          ray_remote_args={"num_cpus": 0})


def describe_pool(pool_path: str, rows: Sequence[int], out_dir: str | Path, *, embedding: str,
                  cfg: ScoreConfig = ScoreConfig(), batch_rows: int = BATCH_ROWS) -> Path:
    """The cold start's label-free description (`orchestrator/al/cold_start.py`, `embedding`)
    of the pool's `rows`, written as Parquet (`row`, `features`) to `out_dir`, which appears
    whole or not at all (a pass cut short runs again; one written is read as it is). The same
    pipeline as a scoring pass: only the row groups holding `rows` are read, and the volumes
    are described in `score.actors` Ray tasks (CPU only: a description is FFTs and a sort) or,
    with `score.actors = 0` or fewer rows than DESCRIBE_IN_PROCESS_BELOW, in this process; in
    batches of `batch_rows` (the cold start's, whatever a scoring pass's batch: GPUs take larger). The tasks run where the scoring tasks of small passes run, so the
    processes they start are the ones cycle 0's scoring pass reuses."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    describer_kwargs = {"pool_path": absolute(pool_path), "embedding": embedding}
    PoolDescriber(**describer_kwargs)  # a bad embedding fails here, before any task starts
    partial = partial_dir(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    cfg = dataclasses.replace(cfg, batch_size=batch_rows)
    file_rows = rows_per_file(len(rows), cfg)
    if not len(rows):
        partial.mkdir(parents=True)
    elif cfg.actors == 0 or len(rows) < DESCRIBE_IN_PROCESS_BELOW:
        _score_in_process(pool_path, PoolDescriber(**describer_kwargs), partial, batch_rows,
                          rows, file_rows, DESCRIBED_COLUMNS)
    else:
        faulty = (faults.runtime_env() or {}).get("env_vars", {})
        described = _read_rows(pool_path, rows, DESCRIBED_COLUMNS, cfg).map_batches(
            describe_batch, fn_kwargs=describer_kwargs, batch_size=batch_rows,
            batch_format="numpy", num_cpus=cfg.cpus_per_actor,
            # no more tasks than batches: Ray Data warns of a concurrency it cannot use
            compute=ray.data.TaskPoolStrategy(size=min(cfg.actors, -(-len(rows) // batch_rows))),
            runtime_env={"env_vars": {**faulty, SCORING_WORKER_ENV: "1"}},
        )
        _write_files(described, partial, file_rows)
    partial.rename(out_dir)
    return out_dir


def read_description(out_dir: str | Path, rows: Sequence[int]) -> np.ndarray:
    """[len(rows), F] float64: the features `describe_pool` wrote, in the order of `rows`
    (sorted, unique; each must have been described)."""
    table = read_scores(out_dir, ["row", "features"])
    described = table.column("row").to_numpy()
    rows = np.asarray(rows, dtype=np.int64)
    if not np.array_equal(described, rows):
        missing = np.setdiff1d(rows, described)
        raise ValueError(f"{out_dir}: {len(missing)} of the asked rows were not described "
                         f"(first: {missing[:5].tolist()}); remove the folder to describe them again")
    return column_array(table, "features").astype(np.float64)


def scoring_udf(scorer_kwargs: dict, cfg: ScoreConfig, n_rows: int) -> dict:
    """What `map_batches` runs for a pass of `n_rows`. Below `warm_below_rows`: `score_batch`
    as Ray tasks, at most `actors` at once; Ray keeps their processes for the job's later
    tasks, and each keeps its scorer, so the next cycle's pass starts no process and imports
    nothing (`actors/scorer.py`). Else an actor pool of `actors` PoolScorers, started for this
    pass and gone after it: Ray Data queues several batches per actor but, on a small machine,
    runs fewer scoring tasks at once than it has actors (its CPU budget per operator). Also on
    GPUs, where Ray ends a GPU task's process after each task (`max_calls=1`, so that the
    GPU's memory is freed), and warm task workers would start a process for every batch."""
    faulty = (faults.runtime_env() or {}).get("env_vars", {})  # tests: faults for the workers
    if n_rows < cfg.warm_below_rows and not cfg.gpus_per_actor:
        # Ray runs a task only in workers of its runtime environment: one of their own keeps the
        # scoring tasks on the few processes that hold a scorer, not on any of the pool's
        # workers (read, write), each of which would import torch and load the models once.
        env = {"env_vars": {**faulty, SCORING_WORKER_ENV: "1"}}
        return {"fn": score_batch, "fn_kwargs": scorer_kwargs, "runtime_env": env,
                "compute": ray.data.TaskPoolStrategy(size=cfg.actors)}
    return {"fn": PoolScorer, "fn_constructor_kwargs": scorer_kwargs,
            "compute": ray.data.ActorPoolStrategy(size=cfg.actors),
            **({"runtime_env": {"env_vars": faulty}} if faulty else {})}


def scored_rows_filter(rows: np.ndarray, pool_rows: np.ndarray):
    """`row` among `rows` (of the pool's `pool_rows`), as a Ray Data expression that PyArrow's
    Parquet scan also checks against each row group's min/max statistics, to skip row groups.

    PyArrow builds an `is_in` value set again for every row group it filters (~40 ms for
    300,000 values: 12 CPU-minutes over a 300,000-row pool's 1 MB row groups). So when fewer
    rows are skipped than scored, the expression names the skipped ones: runs of consecutive
    rows (a held-out split) as ranges, which the statistics skip whole, when there are few of
    them; else the long runs as ranges and the scattered rest (the labelled of a large pool)
    in a `not_in` set of their own size. None when every row is scored: nothing to filter."""
    rows = np.asarray(rows, dtype=np.int64)
    skipped = np.setdiff1d(np.asarray(pool_rows, dtype=np.int64), rows, assume_unique=True)
    if not len(skipped):
        return None
    if len(rows) <= len(skipped):
        return col("row").is_in(rows.tolist())
    runs = np.split(skipped, np.flatnonzero(np.diff(skipped) != 1) + 1)
    as_range = [len(runs) <= FEW_RUNS or len(run) >= LONG_RUN for run in runs]
    scattered = [run for run, ranged in zip(runs, as_range) if not ranged]
    keep = col("row").not_in(np.concatenate(scattered).tolist()) if scattered else None
    for run in (run for run, ranged in zip(runs, as_range) if ranged):
        outside = (col("row") < int(run[0])) | (col("row") > int(run[-1]))
        keep = outside if keep is None else keep & outside
    return keep


def limit_buffer(context: ray.data.DataContext, buffer_mb: int) -> None:
    """Cap the object-store memory the pass's blocks may hold (Ray Data backpressures the
    reads beyond it), so that scoring memory does not grow with the pool. Ray Data still lets
    each operator hold at least one block, so a cap below a batch slows it but cannot hang it."""
    options = context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=buffer_mb * 2**20)


def actor_resources(cfg: ScoreConfig) -> dict:
    """What each scoring actor reserves: its CPUs and, on GPU clusters, a GPU or a fraction of
    one (several actors can share a GPU: scoring a batch uses little of it)."""
    resources = {"num_cpus": cfg.cpus_per_actor}
    if cfg.gpus_per_actor > 0:
        resources["num_gpus"] = cfg.gpus_per_actor
    return resources


def _score_in_process(pool_path: str, scorer, partial: Path, batch_size: int,
                      rows: np.ndarray | None, file_rows: int, columns: list[str] = SCORED_COLUMNS) -> None:
    """The same batches through the same scorer, into files of at least `file_rows` rows (the
    last one smaller), as Ray Data does; with `rows`, only the row groups holding them are read
    and only they are scored."""
    partial.mkdir(parents=True)
    batches = (iter_batches(pool_path, columns=columns, batch_rows=batch_size) if rows is None
               else iter_rows(pool_path, rows, columns, batch_rows=batch_size))
    pending: list[pa.Table] = []
    files = 0
    for batch in batches:
        result = scorer({c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns})
        table = pa.table({
            key: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(value))
            if np.ndim(value) > 1 else value
            for key, value in result.items()
        })
        if table.num_rows:  # an empty batch lacks the columns of arrays it had no row for
            pending.append(table)
        if sum(t.num_rows for t in pending) >= file_rows:
            pq.write_table(pa.concat_tables(pending), partial / f"part-{files:05d}.parquet")
            pending, files = [], files + 1
    if pending:
        pq.write_table(pa.concat_tables(pending), partial / f"part-{files:05d}.parquet")


def read_scores(scores_dir: str | Path, columns: Sequence[str] | None = None, sort: bool = True) -> pa.Table:
    """The scores written by `score_pool` (only the asked columns), sorted by pool row; with
    ``sort=False`` in the files' order (a reduction that looks rows up by number needs no
    order, and sorting 10⁶ rows is a third of reading them)."""
    files = sorted(Path(scores_dir).glob("*.parquet"))
    tables = [_read_file(f, columns) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.int64()) for c in (columns or ["row"])})
    table = pa.concat_tables(tables)
    return table.sort_by("row") if sort else table


def iter_scores(scores_dir: str | Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """The scores written by `score_pool`, file by file (a block of the pass each, in no
    particular row order): what a reduction over the pass reads, one block in memory at a time."""
    for path in sorted(Path(scores_dir).glob("*.parquet")):
        table = _read_file(path, columns)
        if table.num_rows:
            yield table


def _read_file(path: Path, columns: Sequence[str] | None) -> pa.Table:
    """One score file's columns. Through ParquetFile, not read_table: read_table plans a dataset
    for each file, half the time of reading a 10⁶-row pass back (119 files, read three times)."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=list(columns) if columns else None)


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy; tensor columns (probabilities, embeddings) come back [N, …]."""
    column = table.column(name).combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):
        return column.to_numpy_ndarray()
    if hasattr(column.type, "storage_type"):
        return column.to_numpy()
    return column.to_numpy(zero_copy_only=False)
