"""A finished campaign's predictions in the field's formats.

    python orchestrator/run.py export RUN_DIR [--star OUT.star] [--copick CONFIG.json]
        [--user-id cryoal] [--session-id NAME]

- RELION STAR (`RUN_DIR/predictions.star` unless --star says where): one row per subtomogram
  with rlnClassNumber (the predicted class, 1-based: class i of the pool's class names is
  number i + 1) and rlnMaxValueProbDistribution (the model's probability of that class), beside
  rlnImageName (section@stack, as RELION writes it), rlnTomoName and rlnCoordinateX/Y/Z where the
  pool knows them; written with `starfile`. Select a class with e.g.
  `relion_star_handler --i predictions.star --select rlnClassNumber --minval 2 --maxval 2`.
- copick: one Picks file per run and class (the class name is the pickable object), each
  point's score the model's probability, user id `cryoal` and a session id naming the campaign
  (its run directory's name). Only subtomograms ingested from a copick project have positions
  to write back.

A campaign writes both by itself when it finishes (`after_campaign`): the STAR file always, the
picks when its pool was ingested from a copick project (into that project).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from orchestrator.data import copick_io
from orchestrator.data.copick_io import CopickError
from orchestrator.data.pool import PoolError, PoolInfo, open_pool, read_index
from orchestrator.data.storage import is_uri, join, read_text
from orchestrator.data.volumes import VOLUME_SUFFIXES

log = logging.getLogger("cryoal.export")

PREDICTIONS = "predictions.parquet"
STAR_FILE = "predictions.star"
INGEST_REPORT = "ingest_report.json"


class ExportError(ValueError):
    """Nothing to export, or nowhere to put it; the message says which."""


def predictions_table(run_dir: Path, info: PoolInfo) -> dict[str, np.ndarray]:
    """predictions.parquet joined with the pool's index, by row: columns as numpy arrays."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        raise ExportError(f"{run_dir}: no {PREDICTIONS} (the campaign has not finished)")
    predictions = pq.read_table(path, columns=["row", "pred", "pred_prob"]).sort_by("row")
    index = read_index(info.path, ["row", "source", "tomogram", "x", "y", "z", "voxel_size_A"]).sort_by("row")
    rows = predictions.column("row").to_numpy()
    position = np.searchsorted(index.column("row").to_numpy(), rows)
    columns = {name: np.asarray(predictions.column(name).to_numpy()) for name in ("row", "pred", "pred_prob")}
    for name in ("source", "tomogram", "x", "y", "z", "voxel_size_A"):
        columns[name] = np.asarray(index.column(name).to_pylist(), dtype=object)[position]
    return columns


def write_star(run_dir: Path, info: PoolInfo, out: Path | None = None) -> Path:
    import pandas as pd
    import starfile

    table = predictions_table(run_dir, info)
    frame = {}
    images = [_relion_image(s) for s in table["source"]]
    if all(images):
        frame["rlnImageName"] = images
    if all(t is not None for t in table["tomogram"]):
        frame["rlnTomoName"] = list(table["tomogram"])
    for axis in ("x", "y", "z"):
        if all(v is not None for v in table[axis]):
            frame[f"rlnCoordinate{axis.upper()}"] = table[axis].astype(float)
    frame["rlnClassNumber"] = table["pred"].astype(int) + 1
    frame["rlnMaxValueProbDistribution"] = table["pred_prob"].astype(float)
    out = Path(out) if out is not None else Path(run_dir) / STAR_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    starfile.write({"particles": pd.DataFrame(frame)}, tmp, overwrite=True)
    tmp.replace(out)  # a reader never sees half a file
    return out


def _relion_image(source: str | None) -> str | None:
    """The pool's source as RELION's rlnImageName: `stack.mrcs@3` → `3@stack.mrcs`; None for
    sources that are no volume file (array rows, copick picks, simulated subtomograms)."""
    path, at, section = (source or "").rpartition("@")
    if not (at and section.isdigit()):
        path, section = source or "", None
    if not path.lower().endswith(VOLUME_SUFFIXES):
        return None
    return path if section is None else f"{section}@{path}"


def write_copick(run_dir: Path, info: PoolInfo, config: Path, *, user_id: str = copick_io.DEFAULT_USER,
                 session_id: str | None = None) -> dict[str, int]:
    """Predictions of the pool's copick subtomograms as picks in `config`'s project."""
    table = predictions_table(run_dir, info)
    mine = np.array([str(s).startswith(copick_io.SOURCE_PREFIX) for s in table["source"]], dtype=bool)
    if not mine.any():
        raise ExportError(f"{info.path}: no subtomogram of this pool was ingested from a copick project "
                          "(only those have positions to write back)")
    xyz = np.stack([table[a][mine].astype(float) for a in ("x", "y", "z")], axis=1)
    positions_A = xyz * table["voxel_size_A"][mine].astype(float)[:, None]  # voxels of the tomogram → Å
    classes = [info.class_names[p] for p in table["pred"][mine]]
    session = copick_io.session_name(session_id or Path(run_dir).name)
    return copick_io.write_picks(config, table["tomogram"][mine], classes, positions_A,
                                 table["pred_prob"][mine].astype(float), user_id=user_id, session_id=session)


def copick_config_of(info: PoolInfo) -> Path | None:
    """The copick project the pool was ingested from, per its ingest_report.json."""
    report = join(info.path, INGEST_REPORT)
    try:
        saved = json.loads(read_text(report))
    except (OSError, ValueError):
        return None
    return Path(saved["source"]) if saved.get("kind") == "copick" and not is_uri(saved["source"]) else None


def after_campaign(run_dir: Path, info: PoolInfo) -> None:
    """What a finished campaign exports by itself: the STAR file, and the picks when the pool
    came from a copick project. A project that cannot take them is reported, not fatal: the
    campaign's results are all in the run directory, and `run.py export` retries."""
    write_star(run_dir, info)
    config = copick_config_of(info)
    if config is None:
        return
    try:
        written = write_copick(run_dir, info, config)
    except (CopickError, ExportError, OSError) as err:
        log.warning("predictions not written to the copick project %s: %s (retry: python "
                    "orchestrator/run.py export %s --copick %s)", config, err, run_dir, config)
        return
    print(f"predictions written to the copick project {config}: "
          + ", ".join(f"{n} {name}" for name, n in sorted(written.items())), flush=True)


def _pool_of(run_dir: Path) -> PoolInfo:
    state_path = Path(run_dir) / "state.json"
    try:
        pool = json.loads(state_path.read_text())["pool"]
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{run_dir}: not a campaign's run directory ({state_path}: {err})") from err
    return open_pool(pool)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator/run.py export",
                                     description="Write a finished campaign's predictions as RELION STAR "
                                                 "and/or copick picks.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--star", help=f"STAR file to write (default: RUN_DIR/{STAR_FILE})")
    parser.add_argument("--copick", help="copick config .json whose project gets the picks "
                                         "(default: the project the pool was ingested from, if any)")
    parser.add_argument("--user-id", default=copick_io.DEFAULT_USER, help="copick user id of the picks")
    parser.add_argument("--session-id", help="copick session id (default: the run directory's name)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        info = _pool_of(run_dir)
        print(f"STAR: {write_star(run_dir, info, args.star)}")
        config = Path(args.copick) if args.copick else copick_config_of(info)
        if config is not None:
            written = write_copick(run_dir, info, config, user_id=args.user_id, session_id=args.session_id)
            print(f"copick {config}: " + ", ".join(f"{n} {name}" for name, n in sorted(written.items())))
    except (ExportError, CopickError, PoolError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
