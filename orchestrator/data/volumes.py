"""The one place that reads and writes volume files: MRC (mrcfile) and TOM/Dynamo `.em` (emfile).

Arrays are always float32 in [z, y, x] order (mrcfile's order). A header voxel size of 0 means
"unknown" (some tools write that), and is returned as None rather than treated as an error.

MRC files are opened in mrcfile's permissive mode: headers that other tools write loosely (a
zero machine stamp, no `MAP ` ID string) still give their voxels, and the fault is returned in
`MrcContents.header_faults` for the caller to warn about. A file whose data cannot be located
(truncated, unknown mode, not an MRC file at all) is still refused.

How a file's 3-D array splits into volumes (`_layout`), from the header:
- MRC volume stack (space group 401): nz / mz volumes of mz sections;
- MRC image stack (space group 0 with mz = 1, the MRC2014 convention): 2-D images, refused;
- a `.mrcs` file (RELION's suffix for image stacks) that is not one cube: cubes of ny stacked
  along z when the header's mz says so (mz = ny), otherwise 2-D images (a tilt series or a
  RELION 5 / Warp 2-D particle stack), refused;
- anything else: one volume.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import emfile
import mrcfile
import numpy as np

MRC_SUFFIXES = (".mrc", ".map", ".mrcs", ".rec", ".st")
EM_SUFFIXES = (".em",)
VOLUME_SUFFIXES = MRC_SUFFIXES + EM_SUFFIXES
EM_HEADER_BYTES = 512
COMPLEX_MRC_MODES = {3: "complex int16", 4: "complex float32"}
COMPLEX_EM_TYPES = {8: "complex float32", 10: "complex float64"}


class VolumeError(ValueError):
    """A file that cannot give a subtomogram; the message names the file and the reason.

    `code` says which way it is bad: "unreadable", "not_a_volume" (2-D images) or "complex"."""

    def __init__(self, message: str, code: str = "unreadable"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MrcContents:
    sections: np.ndarray  # float32 [n, z, y, x]: one volume per section
    voxel_size_A: float | None
    header_faults: tuple[str, ...] = ()  # what permissive reading forgave, e.g. "no MAP ID"


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, int, int]  # (nz, ny, nx) as stored
    ispg: int | None  # MRC space group; None for .em
    mz: int | None
    voxel_size_A: float | None
    faults: tuple[str, ...]


def read_sections(path: str | Path) -> MrcContents:
    """Every volume in a file: one for a plain volume, n for a volume stack (see the module
    docstring for how stacks are told from image stacks)."""
    path = Path(path)
    header, data = _read(path)
    count, box = _layout(path, header)
    if data.size != count * int(np.prod(box)):
        raise VolumeError(f"{path}: truncated file: header promises {count * int(np.prod(box))} "
                          f"voxels, found {data.size}")
    return MrcContents(data.reshape(count, *box), header.voxel_size_A, header.faults)


def peek_sections(path: str | Path) -> tuple[int, tuple[int, int, int]]:
    """(number of volumes, their [z, y, x] box) from the header alone; VolumeError as
    read_sections would raise for the header (the data may still turn out damaged)."""
    path = Path(path)
    return _layout(path, _read_header(path))


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


# ---------------------------------------------------------------------------------------------


def _layout(path: Path, header: _Header) -> tuple[int, tuple[int, int, int]]:
    nz, ny, nx = header.shape
    if min(header.shape) < 1:
        raise VolumeError(f"{path}: the header gives no voxels (shape {header.shape})")
    if ny == 1 or nx == 1 or nz == 1:
        raise VolumeError(f"{path}: a 2-D image (shape {_dims(header.shape)}) where a 3-D volume "
                          "is expected", "not_a_volume")
    mz = header.mz or 0
    if header.ispg == 401 and 1 < mz < nz and nz % mz == 0:
        return nz // mz, (mz, ny, nx)
    if header.ispg == 0 and mz == 1:
        raise _image_stack(path, header.shape, "MRC space group 0 with mz = 1: an image stack")
    if path.suffix.lower() == ".mrcs" and not nz == ny == nx:
        if mz == ny and nz % ny == 0:  # the header says: sections of ny, i.e. cubes along z
            return nz // ny, (ny, ny, nx)
        raise _image_stack(path, header.shape, "a .mrcs file whose header does not declare "
                                               "cubes stacked along z (mz = ny)")
    return 1, (nz, ny, nx)


def _image_stack(path: Path, shape, why: str) -> VolumeError:
    nz, ny, nx = shape
    return VolumeError(
        f"{path}: {nz} 2-D images of {ny}x{nx} ({why}), not subtomograms: a tilt series or a "
        "2-D particle stack. Extract 3-D subtomograms instead (RELION 5 Extract subtomos: "
        "'Write output as 2D stacks?' No; WarpTools ts_export_particles --3d)", "not_a_volume",
    )


def _dims(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _read(path: Path) -> tuple[_Header, np.ndarray]:
    if path.suffix.lower() in EM_SUFFIXES:
        return _read_em(path)
    return _read_mrc(path)


def _read_header(path: Path) -> _Header:
    if path.suffix.lower() in EM_SUFFIXES:
        return _em_header(path)[0]
    return _open_mrc(path, header_only=True)[0]


def _open_mrc(path: Path, header_only: bool) -> tuple[_Header, np.ndarray | None]:
    if not path.is_file():
        raise VolumeError(f"{path}: no such file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # permissive mode reports header faults as warnings
        try:
            with mrcfile.open(str(path), mode="r", permissive=True, header_only=header_only) as mrc:
                h = mrc.header
                shape, ispg, mz, mode = (int(h.nz), int(h.ny), int(h.nx)), int(h.ispg), int(h.mz), int(h.mode)
                voxel = float(mrc.voxel_size.x)
                data = None if header_only or mrc.data is None else np.asarray(mrc.data)
                data_bytes = _mrc_data_bytes(path, h) if header_only else None
        except VolumeError:
            raise
        except (ValueError, OSError, EOFError) as err:  # how mrcfile reports unreadable headers
            raise VolumeError(f"{path}: not a readable MRC file ({err})") from err
    # mrcfile's permissive mode warns RuntimeWarning; other warnings (e.g. NumPy deprecations
    # inside mrcfile) say nothing about the file
    faults = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)))
    if mode in COMPLEX_MRC_MODES:
        raise VolumeError(f"{path}: complex-valued MRC (mode {mode}, {COMPLEX_MRC_MODES[mode]}): "
                          "a Fourier transform, not a real-space density", "complex")
    if not header_only and data is None:
        truncated = any("bytes in data block" in f for f in faults)
        what = "truncated MRC file" if truncated else "not a readable MRC file"
        raise VolumeError(f"{path}: {what} ({'; '.join(faults) or 'no data block'})")
    if data_bytes is not None and data_bytes > path.stat().st_size:
        # mrcfile checks this only when it reads the data: a peek must refuse the same files
        raise VolumeError(f"{path}: truncated or not an MRC file: the header promises "
                          f"{data_bytes} bytes, the file has {path.stat().st_size}")
    return _Header(shape, ispg, mz, voxel if voxel > 0 else None, faults), data


def _mrc_data_bytes(path: Path, h) -> int:
    """Header plus voxels, as the header describes them; unknown modes raise."""
    try:
        itemsize = mrcfile.utils.dtype_from_mode(h.mode).itemsize
    except ValueError as err:
        raise VolumeError(f"{path}: not a readable MRC file ({err})") from err
    return 1024 + int(h.nsymbt) + int(h.nx) * int(h.ny) * int(h.nz) * itemsize


def _read_mrc(path: Path) -> tuple[_Header, np.ndarray]:
    header, data = _open_mrc(path, header_only=False)
    if data.size == 0:
        raise VolumeError(f"{path}: MRC file holds no voxels")
    return header, data.astype(np.float32)


def _em_header(path: Path) -> tuple[_Header, dict]:
    if not path.is_file():
        raise VolumeError(f"{path}: no such file")
    try:
        raw, _ = emfile.read(str(path), header_only=True)
    except (ValueError, OSError) as err:  # struct.error is a ValueError
        raise VolumeError(f"{path}: not a readable .em file ({err})") from err
    code = raw["dtype"]
    if code in COMPLEX_EM_TYPES:
        raise VolumeError(f"{path}: complex-valued .em file ({COMPLEX_EM_TYPES[code]}): a Fourier "
                          "transform, not a real-space density", "complex")
    if code not in emfile.specs.dtype_spec:
        raise VolumeError(f"{path}: not a readable .em file (unknown data type code {code})")
    dtype = np.dtype(emfile.specs.dtype_spec[code])
    shape = (int(raw["zdim"]), int(raw["ydim"]), int(raw["xdim"]))
    expected = EM_HEADER_BYTES + int(np.prod(shape)) * dtype.itemsize
    if min(shape) >= 1 and path.stat().st_size < expected:
        raise VolumeError(f"{path}: truncated .em file: header promises {expected} bytes, "
                          f"found {path.stat().st_size}")
    # The .em header carries no voxel size a reader can rely on: unknown, as a 0 in MRC.
    return _Header(shape, None, None, None, ()), raw


def _read_em(path: Path) -> tuple[_Header, np.ndarray]:
    header, _ = _em_header(path)
    if min(header.shape) < 1:
        return header, np.zeros(0, np.float32)  # _layout names the fault
    try:
        _, data = emfile.read(str(path), mmap=True)  # reads just the voxels the header promises
        volume = np.array(data, dtype=np.float32)
        del data  # closes the memory map
    except (ValueError, OSError) as err:
        raise VolumeError(f"{path}: not a readable .em file ({err})") from err
    return header, volume
