"""Where pools and run directories live: a local path, or a URI (s3://, gs://, hdfs://, file://)
read and written through pyarrow's filesystems.

A plain path is never a URI, so local pools and runs keep exactly the code paths they always
had. Credentials are pyarrow's: the environment, instance roles or config files of each
filesystem, on the driver and on every Ray worker that reads the pool.

A run directory at a URI is mirrored, as Ray Train's `storage_path` does with checkpoints: the
campaign works in a local staging directory (the ledger's atomic writes, Ray Train's checkpoints
and the scoring output stay local), and `RunMirror.upload` copies what changed after every step
that writes state. `--resume URI` downloads it first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

STAGING_ENV = "CRYOAL_STAGING_DIR"  # where run directories at URIs are staged (default: temp dir)
LAST = ("pool.json", "state.json")  # uploaded after every other file, in this order
NOT_UPLOADED = ("ray_train",)  # Ray Train's epoch checkpoints: superseded by model.pt
# Scoring outputs are directories of Parquet parts, which object storage cannot show all at once;
# a resume that downloaded part of one would take it for whole. They are uploaded for the record
# and computed again (same model.pt, same scores) if a resumed campaign needs them.
NOT_DOWNLOADED = ("scores", "predictions")
OBJECT_STORES = ("s3", "gcs")  # a written object appears whole: no temp name needed
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(OSError):
    """A URI whose filesystem cannot be opened, read or written; the message names the URI."""


def is_uri(text) -> bool:
    """`s3://…`, `gs://…`, `file://…`, `hdfs://…` are URIs; plain paths (and Path objects) are not."""
    return isinstance(text, str) and bool(_SCHEME.match(text))


@functools.lru_cache(maxsize=32)
def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `uri` and the path on it. Cached: S3 resolves a bucket's region with a
    request, and every pool read would otherwise make one again."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # unknown scheme, missing driver, unreachable endpoint
        raise StorageError(f"{uri}: cannot open its filesystem ({err})") from err


def join(base: str | Path, *parts: str) -> str:
    """`base/part/…` for a path or a URI (whose `?query`, e.g. an S3 region, stays at the end)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    base, mark, query = str(base).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def absolute(path: str | Path) -> str:
    """A URI as it is, a plain path resolved (Ray workers do not share the driver's cwd)."""
    return path if is_uri(path) else str(Path(path).resolve())


def is_file(path: str | Path) -> bool:
    if not is_uri(path):
        return Path(path).is_file()
    filesystem, inner = filesystem_for(path)
    try:
        return filesystem.get_file_info(inner).type == pafs.FileType.File
    except OSError as err:  # no credentials, no network, no such bucket
        raise StorageError(f"{path}: cannot reach it ({err})") from err


def read_text(path: str | Path) -> str:
    """A small text file (a manifest, a config) from a path or a URI."""
    if not is_uri(path):
        return Path(path).read_text()
    filesystem, inner = filesystem_for(path)
    try:
        with filesystem.open_input_stream(inner) as f:
            return f.read().decode("utf-8")
    except OSError as err:
        raise StorageError(f"{path}: cannot read it ({err})") from err


def staging_dir(uri: str) -> Path:
    """The local working copy of the run directory at `uri`: under $CRYOAL_STAGING_DIR, else
    the system temp dir, named after the URI (readable part + hash, so two URIs never share)."""
    root = Path(os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "cryoal-staging")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri).strip("_")[-60:]
    return root / f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"


def open_run_dir(where: str | Path) -> tuple[Path, "RunMirror | None"]:
    """The local directory a campaign works in, and the mirror that uploads it to `where`
    (None for a plain path, which is worked in directly)."""
    if not is_uri(where):
        return Path(where), None
    mirror = RunMirror(str(where), staging_dir(str(where)))
    return mirror.local, mirror


class RunMirror:
    """A run directory at a URI and its local staging copy. The remote copy is the truth: a
    resume downloads it over the staging copy, and re-runs any step it does not record."""

    def __init__(self, uri: str, local: Path):
        self.uri = uri
        self.local = Path(local)
        self._fs, self._root = filesystem_for(uri)
        self._root = self._root.rstrip("/")
        self._sent: dict[str, tuple[int, int]] = {}  # relative path → (mtime_ns, size) uploaded
        self._dirs: set[str] = set()  # remote directories known to exist

    def remote_has(self, relative: str) -> bool:
        return is_file(join(self.uri, relative))

    def reset(self) -> None:
        """Empty the staging directory for a new run: files an earlier run at the same URI
        left there must not be read as this run's (a stale state.json would be resumed)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        self._sent = {}

    def download(self) -> None:
        """The remote files into the staging directory (local files it lacks are kept), but
        for scoring outputs (NOT_DOWNLOADED) and upload leftovers."""
        remote = [rel for rel in self._remote_files() if _wanted(rel, NOT_DOWNLOADED)]
        for rel in remote:
            (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            self._call(f"download {rel}", lambda: pafs.copy_files(
                f"{self._root}/{rel}", str(self.local / rel), source_filesystem=self._fs,
                destination_filesystem=pafs.LocalFileSystem()))
        # Only what came from the remote counts as sent: a staging file it lacks (written
        # before a crash, never uploaded) goes up with the next upload.
        self._sent = {rel: _stamp(self.local / rel) for rel in remote}

    def upload(self) -> None:
        """Every staging file changed since the last upload, state.json last."""
        changed = [rel for rel, stamp in self._local_files().items() if self._sent.get(rel) != stamp]
        for rel in sorted(changed, key=_upload_order):
            stamp = _stamp(self.local / rel)
            self._put(rel)
            self._sent[rel] = stamp

    def _put(self, rel: str) -> None:
        target = f"{self._root}/{rel}"
        parent = target.rsplit("/", 1)[0]
        if parent not in self._dirs:
            self._call(f"upload {rel}", lambda: self._fs.create_dir(parent, recursive=True))
            self._dirs.add(parent)
        # On a filesystem a reader could see a half-written file: write beside it, then rename.
        direct = self._fs.type_name in OBJECT_STORES
        written = target if direct else f"{parent}/.{rel.rsplit('/', 1)[-1]}.upload"

        def copy():
            try:
                with open(self.local / rel, "rb") as source, self._fs.open_output_stream(written) as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            except OSError:
                if not direct:  # leave no half-written temp file behind
                    with contextlib.suppress(OSError):
                        self._fs.delete_file(written)
                raise
            if not direct:
                self._fs.move(written, target)

        self._call(f"upload {rel}", copy)

    def _call(self, what: str, action):
        try:
            return action()
        except OSError as err:
            raise StorageError(f"{self.uri}: cannot {what} ({err}); the staging copy "
                               f"{self.local} is complete up to this step") from err

    def _remote_files(self) -> list[str]:
        selector = pafs.FileSelector(self._root, recursive=True, allow_not_found=True)
        infos = self._call("list it", lambda: self._fs.get_file_info(selector))
        prefix = len(self._root) + 1
        return [i.path[prefix:] for i in infos if i.type == pafs.FileType.File]

    def _local_files(self) -> dict[str, tuple[int, int]]:
        """Staging files worth uploading (see `_wanted`), with their stamps."""
        files = {}
        for directory, subdirs, names in os.walk(self.local):
            for name in names:
                rel = Path(directory, name).relative_to(self.local).as_posix()
                if _wanted(rel, NOT_UPLOADED):
                    files[rel] = _stamp(self.local / rel)
        return files


def _wanted(rel: str, skipped_dirs: tuple[str, ...]) -> bool:
    """Not a temp file, lock or partial output (a name starting with a dot or ending in
    .partial, anywhere in the path), nor inside one of `skipped_dirs`."""
    parts = rel.split("/")
    hidden = any(p.startswith(".") or p.endswith(".partial") for p in parts)
    return not hidden and not set(parts[:-1]) & set(skipped_dirs)


def _upload_order(rel: str) -> tuple[int, str]:
    """pool.json (a simulated pool's manifest) and state.json each say that the files they
    refer to are complete; sent after those files, they are never ahead of them on the remote
    if an upload is cut short (state.json records a step only once its files exist)."""
    name = rel.rsplit("/", 1)[-1]
    return (LAST.index(name) + 1 if name in LAST else 0, rel)


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_mtime_ns, status.st_size
