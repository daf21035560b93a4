"""The one place that reads and writes MRC files.

Arrays are always float32 in [z, y, x] order (mrcfile's order). A header voxel size of 0 means
"unknown" (some tools write that), and is returned as None rather than treated as an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

MRC_SUFFIXES = (".mrc", ".map", ".mrcs", ".rec", ".st")


class VolumeError(ValueError):
    """A file that cannot give a subtomogram; the message names the file and the reason."""


@dataclass(frozen=True)
class MrcContents:
    sections: np.ndarray  # float32 [n, z, y, x]: one volume per section
    voxel_size_A: float | None


def read_sections(path: str | Path) -> MrcContents:
    """Every volume in an MRC file: one for a plain volume, n for a volume stack.

    A volume stack is either a true MRC volume stack (space group 401) or, in a `.mrcs` file,
    cubes of side ny stacked along z (how several tools write subtomogram stacks).
    """
    path = Path(path)
    data, voxel = _read_mrc(path)
    if data.ndim == 4:
        return MrcContents(data, voxel)
    if data.ndim != 3 or min(data.shape) == 1:
        raise VolumeError(f"{path}: a 2-D image (shape {data.shape}) where a 3-D volume is expected")
    nz, ny, nx = data.shape
    if path.suffix.lower() == ".mrcs" and ny == nx and nz % ny == 0 and nz > ny:
        return MrcContents(data.reshape(nz // ny, ny, ny, nx), voxel)
    return MrcContents(data[None], voxel)


def read_volume(path: str | Path) -> tuple[np.ndarray, float | None]:
    """A single volume [z, y, x] and its voxel size in Å (None when the header says 0)."""
    contents = read_sections(path)
    if contents.sections.shape[0] != 1:
        raise VolumeError(
            f"{path}: holds {contents.sections.shape[0]} volumes; expected a single volume"
        )
    return contents.sections[0], contents.voxel_size_A


def write_volume(path: str | Path, volume: np.ndarray, voxel_size_A: float | None = None) -> None:
    """Write a [z, y, x] volume (or an [n, z, y, x] volume stack) as float32 MRC."""
    volume = np.asarray(volume, dtype=np.float32)
    with mrcfile.new(str(path), overwrite=True) as mrc:
        if volume.ndim == 4:
            mrc.set_data(volume.reshape(-1, *volume.shape[2:]))
            mrc.header.ispg = 401
            mrc.header.mz = volume.shape[1]
            mrc.update_header_from_data()
            mrc.header.ispg = 401
            mrc.header.mz = volume.shape[1]
        else:
            mrc.set_data(volume)
        if voxel_size_A:
            mrc.voxel_size = voxel_size_A


def _read_mrc(path: Path) -> tuple[np.ndarray, float | None]:
    if not path.is_file():
        raise VolumeError(f"{path}: no such file")
    try:
        with mrcfile.open(str(path), mode="r") as mrc:
            data = np.array(mrc.data, dtype=np.float32)
            expected = _expected_voxels(mrc.header)
            voxel = float(mrc.voxel_size.x)
    except (ValueError, OSError, EOFError) as err:  # how mrcfile reports damaged files
        what = "truncated MRC file" if "data block" in str(err) else "not a readable MRC file"
        raise VolumeError(f"{path}: {what} ({err})") from err
    if expected is not None and data.size != expected:
        raise VolumeError(
            f"{path}: truncated MRC file: header promises {expected} voxels, found {data.size}"
        )
    if data.size == 0:
        raise VolumeError(f"{path}: MRC file holds no voxels")
    return data, (voxel if voxel > 0 else None)


def _expected_voxels(header) -> int | None:
    try:
        return int(header.nx) * int(header.ny) * int(header.nz)
    except (TypeError, ValueError):
        return None
