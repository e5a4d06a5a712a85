"""Where bytes live: uploads (blobs) and job artifacts under ``data_dir``, written atomically.

Every path is built here from server-made UUIDs and a fixed set of artifact names; a user's
file name is kept as display metadata only and never touches the filesystem. Writes go to a
temporary file in the same filesystem, are fsynced, then renamed into place, so a reader (or
a restart) never sees half a file. The sha256 is computed while the bytes go by.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.errors import InsufficientStorageError
from mono_quant.errors import InputTooLargeError

__all__ = ["ARTIFACT_MEDIA_TYPES", "Storage", "BlobWriter", "StoredFile", "sha256_file"]

# The artifact names a job can produce, with their media types (a closed list: names in URLs
# are looked up here, never joined to a path as given).
ARTIFACT_MEDIA_TYPES: dict[str, str] = {
    "model.safetensors": "application/octet-stream",
    "report.json": "application/json",
    # one per export format (mono_quant.export.ARTIFACT_NAMES)
    "compressed-tensors.zip": "application/zip",
    "model.gguf": "application/octet-stream",
    "model.onnx": "application/octet-stream",
}
_HASH_CHUNK = 1024 * 1024
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _disk_full(exc: OSError) -> InsufficientStorageError:
    return InsufficientStorageError(
        f"the server's storage is full ({exc.strerror or exc}); nothing was kept",
        suggestion="Retry later; if it persists, the operator must free space in MONOQUANT_DATA_DIR.",
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """A file that has been written completely: where it is, its size and sha256."""

    path: Path
    size: int
    sha256: str


class BlobWriter:
    """Receives a file chunk by chunk: hashes it, counts it, refuses it past ``limit`` bytes.

    Use as a context manager; leaving it without :meth:`commit` removes the temporary file.

    Example:
        >>> storage = Storage(Path(tempfile.mkdtemp()))  # doctest: +SKIP
        >>> with storage.writer(limit=10) as writer:       # doctest: +SKIP
        ...     writer.write(b"hello")
        ...     stored = writer.commit(storage.blob_path(uuid.uuid4()))
    """

    def __init__(self, temp_path: Path, limit: int) -> None:
        self.temp_path = temp_path
        self.limit = limit
        self.size = 0
        self._digest = hashlib.sha256()
        try:
            self._handle = open(temp_path, "wb")  # noqa: SIM115 - closed in commit()/discard()
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise _disk_full(exc) from None
            raise

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise InputTooLargeError(
                f"upload is larger than the limit of {self.limit} bytes",
                suggestion="Upload a smaller file, or ask the operator to raise MONOQUANT_MAX_UPLOAD_BYTES.",
            )
        self._digest.update(chunk)
        try:
            self._handle.write(chunk)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        """A write failed: the partial file goes at once (a full disk must not stay full)."""
        self.discard()
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc) from None
        raise exc

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        if not self._handle.closed:
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
            except OSError as exc:
                self._fail(exc)

    def commit(self, destination: Path) -> StoredFile:
        """Move the finished file to ``destination`` atomically."""
        self.close()
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, destination)
        return StoredFile(destination, self.size, self.sha256)

    def discard(self) -> None:
        if not self._handle.closed:
            try:
                self._handle.close()
            except OSError:  # flushing the buffer failed (disk full): the file goes anyway
                pass
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.temp_path.exists():
            self.discard()


class Storage:
    """The directory layout under ``root``::

    tmp/                      partial writes (same filesystem, so rename is atomic)
    blobs/<uuid>              uploaded models and datasets
    artifacts/<job uuid>/     model.safetensors, report.json
    work/<job uuid>/          a job's scratch space (extracted zips), removed afterwards
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.tmp_dir = self.root / "tmp"
        self.blob_dir = self.root / "blobs"
        self.artifact_dir = self.root / "artifacts"
        self.work_dir = self.root / "work"

    def ensure(self) -> None:
        """Create the directories (idempotent)."""
        for directory in (self.tmp_dir, self.blob_dir, self.artifact_dir, self.work_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def sweep_temp(self, older_than_s: float) -> int:
        """Remove partial writes left by processes that died mid-write; returns how many.

        Only files older than ``older_than_s`` go: another process sharing the directory may
        be writing a younger one right now.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.tmp_dir.glob("*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def writable(self) -> bool:
        """True when a file can be created and removed in ``tmp/`` (readiness probe)."""
        probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def temp_path(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    def writer(self, limit: int) -> BlobWriter:
        return BlobWriter(self.temp_path(), limit)

    def blob_path(self, blob_id: uuid.UUID | str) -> Path:
        return self.blob_dir / uuid.UUID(str(blob_id)).hex

    def job_artifact_dir(self, job_id: uuid.UUID | str) -> Path:
        return self.artifact_dir / uuid.UUID(str(job_id)).hex

    def artifact_path(self, job_id: uuid.UUID | str, name: str) -> Path:
        if name not in ARTIFACT_MEDIA_TYPES:
            raise KeyError(name)
        return self.job_artifact_dir(job_id) / name

    def job_work_dir(self, job_id: uuid.UUID | str) -> Path:
        return self.work_dir / uuid.UUID(str(job_id)).hex

    def write_bytes(self, destination: Path, data: bytes) -> StoredFile:
        """Write ``data`` to ``destination`` atomically."""
        with self.writer(limit=max(len(data), 1)) as writer:
            writer.write(data)
            return writer.commit(destination)

    def import_file(self, source: Path, destination: Path) -> StoredFile:
        """Copy ``source`` to ``destination`` atomically, hashing it on the way."""
        with open(source, "rb") as handle, self.writer(limit=os.fstat(handle.fileno()).st_size + 1) as writer:
            while chunk := handle.read(_HASH_CHUNK):
                writer.write(chunk)
            return writer.commit(destination)

    def remove_blob(self, blob_id: uuid.UUID | str) -> None:
        self.blob_path(blob_id).unlink(missing_ok=True)

    def remove_job_files(self, job_id: uuid.UUID | str) -> None:
        self.remove_artifacts(job_id)
        self.remove_work_dir(job_id)

    def remove_artifacts(self, job_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.job_artifact_dir(job_id), ignore_errors=True)

    def remove_work_dir(self, job_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.job_work_dir(job_id), ignore_errors=True)

    @staticmethod
    def iter_range(path: Path, start: int, end: int, chunk: int = _HASH_CHUNK) -> Iterator[bytes]:
        """Bytes ``start..end`` (inclusive) of ``path``, in chunks."""
        with open(path, "rb") as handle:
            handle.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                data = handle.read(min(chunk, remaining))
                if not data:
                    break
                remaining -= len(data)
                yield data
