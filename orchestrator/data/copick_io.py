"""copick projects, both ways: subtomograms cut out of a project's tomograms at its picks
(ingest), and a campaign's predictions written back as picks (export).

Positions: copick stores picks in Å; a pick's centre is its location plus the translation of
its transform (copick's `full_positions`). The voxel at array index i lies at i × voxel size Å,
so a pick at p Å is cut as the box centred on voxel round(p / voxel size). Pool rows keep the
unrounded position in voxels of the tomogram (x, y, z columns) and the voxel size, so the
export writes back exactly the positions that were ingested.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

SOURCE_PREFIX = "copick:"  # the pool's `source` column for a subtomogram cut from a copick pick
DEFAULT_USER = "cryoal"


class CopickError(ValueError):
    """A copick project or selection that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class CopickSelection:
    """Which tomograms and picks of a project to use (None = the only one there, or all picks)."""

    tomo_type: str | None = None
    voxel_size: float | None = None
    user_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Pick:
    run: str
    object_name: str
    picks_name: str  # user_session_object, as copick names the file
    index: int  # position in that file, 0-based
    position_A: tuple[float, float, float]  # x, y, z


def is_copick_config(path: Path) -> bool:
    """A JSON file with copick's `pickable_objects`."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        return "pickable_objects" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def root_logging_kept():
    """copick's modules reconfigure the root logger when imported (basicConfig(force=True) with
    a rich handler at INFO), which would take over this program's logging: put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _keeps_root_logging(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with root_logging_kept():
            return function(*args, **kwargs)

    return wrapper


@_keeps_root_logging
def open_project(config: str | Path):
    import copick  # heavy (zarr, pydantic, fsspec): only for copick sources and exports

    try:
        return copick.from_file(str(config))
    except (OSError, ValueError, KeyError, TypeError) as err:  # pydantic's errors are ValueErrors
        raise CopickError(f"{config}: not a usable copick config ({err})") from err


def particle_objects(root) -> list[str]:
    return [o.name for o in root.config.pickable_objects if o.is_particle]


@_keeps_root_logging
def _picks_of(run) -> list:
    return list(run.picks)


def iter_picks(root, selection: CopickSelection) -> Iterator[Pick]:
    """Every selected pick of particle objects, run by run in name order; within a run by
    object (config order), user, session."""
    order = {name: i for i, name in enumerate(particle_objects(root))}
    for run in sorted(root.runs, key=lambda r: r.name):
        picks = [p for p in _picks_of(run) if p.pickable_object_name in order and _selected(p, selection)]
        picks.sort(key=lambda p: (order[p.pickable_object_name], p.user_id, p.session_id))
        for picks_file in picks:
            name = f"{picks_file.user_id}_{picks_file.session_id}_{picks_file.pickable_object_name}"
            positions = picks_file.full_positions()
            for i, xyz in enumerate(positions):
                yield Pick(run.name, picks_file.pickable_object_name, name, i, tuple(float(v) for v in xyz))


def _selected(picks, selection: CopickSelection) -> bool:
    return ((selection.user_id is None or picks.user_id == selection.user_id)
            and (selection.session_id is None or picks.session_id == selection.session_id))


class TomogramCutter:
    """Cuts boxes out of each run's tomogram, reading only the chunks a box touches. Picks
    come grouped by run, so one run's tomogram is open at a time."""

    def __init__(self, root, selection: CopickSelection):
        self.root = root
        self.selection = selection
        self._run: str | None = None
        self._array = None
        self._voxel_size = 0.0
        self._missing: str | None = None

    def check(self, run_name: str) -> None:
        """CopickError when the run's tomogram is ambiguous (an option must choose it); a run
        without the tomogram is not an error here: its picks are rejected one by one."""
        self._open(run_name)

    def cut(self, pick: Pick, box: int) -> tuple[np.ndarray, float, tuple[float, float, float]]:
        """(volume [z, y, x], voxel size Å, centre in voxels x, y, z). LookupError: the run has no
        such tomogram; IndexError: the box reaches outside it."""
        self._open(pick.run)
        if self._missing is not None:
            raise LookupError(self._missing)
        centre = tuple(p / self._voxel_size for p in pick.position_A)
        starts = [int(round(c)) - box // 2 for c in centre[::-1]]  # z, y, x
        shape = self._array.shape
        if any(s < 0 or s + box > n for s, n in zip(starts, shape)):
            raise IndexError(
                f"the {box}³ box centred at voxel ({', '.join(f'{c:.1f}' for c in centre)}) reaches "
                f"outside run {pick.run}'s tomogram of {'x'.join(map(str, shape))} voxels [z, y, x]"
            )
        z, y, x = starts
        volume = np.asarray(self._array[z:z + box, y:y + box, x:x + box], dtype=np.float32)
        return volume, self._voxel_size, centre

    @_keeps_root_logging
    def _open(self, run_name: str) -> None:
        if run_name == self._run:
            return
        import zarr

        self._run, self._array, self._missing = run_name, None, None
        try:
            tomogram, self._voxel_size = self._tomogram(self.root.get_run(run_name))
            self._array = zarr.open(tomogram.zarr(), mode="r")["0"]
        except CopickError:
            self._run = None
            raise
        except LookupError as err:
            self._missing = str(err)
        except (OSError, ValueError, KeyError) as err:
            self._missing = f"run {run_name}: cannot read its tomogram ({err})"

    def _tomogram(self, run):
        have = [vs for vs in run.voxel_spacings if vs.tomograms]
        spacings = have
        if self.selection.voxel_size is not None:
            spacings = [vs for vs in have if np.isclose(vs.voxel_size, self.selection.voxel_size)]
        self._one(run.name, spacings, "voxel spacings with tomograms", "--copick-voxel-size",
                  self.selection.voxel_size, [f"{vs.voxel_size:g} Å" for vs in have])
        tomograms = spacings[0].tomograms
        if self.selection.tomo_type is not None:
            tomograms = [t for t in tomograms if t.tomo_type == self.selection.tomo_type]
        self._one(run.name, tomograms, "tomogram types", "--copick-tomo-type", self.selection.tomo_type,
                  [t.tomo_type for t in spacings[0].tomograms])
        return tomograms[0], float(spacings[0].voxel_size)

    @staticmethod
    def _one(run: str, found: list, what: str, option: str, chosen, have: Sequence[str]) -> None:
        if len(found) > 1:
            raise CopickError(f"run {run} has several {what} ({', '.join(have)}): choose one with {option}")
        if not found and chosen is not None:
            raise LookupError(f"run {run} has no {option} {chosen} (it has {', '.join(have) or 'none'})")
        if not found:
            raise LookupError(f"run {run} has no tomogram")


def source_of(config: Path, pick: Pick) -> str:
    return f"{SOURCE_PREFIX}{config}#{pick.run}/{pick.picks_name}[{pick.index}]"


def subtomo_id(pick: Pick) -> str:
    return f"{pick.run}/{pick.picks_name}/{pick.index}"


# -- export -----------------------------------------------------------------------------------


def session_name(text: str) -> str:
    """A copick user or session id from any text (copick allows letters, digits and -)."""
    cleaned = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in text).strip("-")
    return cleaned or "campaign"


@_keeps_root_logging
def write_picks(config: str | Path, runs: Sequence[str], classes: Sequence[str],
                positions_A: np.ndarray, scores: np.ndarray, *, user_id: str, session_id: str) -> dict[str, int]:
    """One Picks file per (run, class) with the given points and scores; replaces the points of
    an earlier export by the same user and session. Returns points written per class."""
    root = open_project(config)
    known = set(particle_objects(root))
    missing = sorted(set(classes) - known)
    if missing:
        raise CopickError(f"{config}: the classes {', '.join(missing)} are not particle objects of the "
                          f"project (it has {', '.join(sorted(known)) or 'none'})")
    runs, classes = np.asarray(runs), np.asarray(classes)
    written: dict[str, int] = {}
    for run_name in sorted(set(runs.tolist())):
        run = root.get_run(run_name)
        if run is None:
            raise CopickError(f"{config}: no run {run_name!r} in the project")
        for name in sorted(set(classes[runs == run_name].tolist())):
            mask = (runs == run_name) & (classes == name)
            picks = run.new_picks(object_name=name, session_id=session_id, user_id=user_id, exist_ok=True)
            picks.from_numpy(positions_A[mask], scores=scores[mask])
            written[name] = written.get(name, 0) + int(mask.sum())
    return written
