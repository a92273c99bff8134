"""Sweep storage: a local directory or any URI pyarrow understands (``s3://``, ``gs://``, ...).

Small result files (Parquet, Markdown, PNG) go through ``pyarrow.fs`` so that a driver on any node
reads and writes the same shared storage; writes go to a temporary name first, then move into place.
"""
from __future__ import annotations

import errno
import io
import shutil
import traceback
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(ValueError):
    """The storage location is unusable (bad URI, not writable, ...)."""


#: Below this many free bytes a local storage counts as full (a checkpoint no longer fits).
FULL_BELOW_BYTES = 1 << 20
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(err: BaseException) -> bool:
    """Whether ``err`` comes from a full disk or quota, also when Ray carries the cause only as text."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _OUT_OF_SPACE:
            return True
        current = current.__cause__ or current.__context__
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return "No space left on device" in text or "Disk quota exceeded" in text


class Storage:
    """A root directory of sweep results, local or remote."""

    def __init__(self, uri: str | Path) -> None:
        uri = str(uri)
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise StorageError(f"storage '{uri}' is not usable ({err}); pass a local directory or "
                               f"a URI pyarrow understands, e.g. s3://bucket/path") from None
        self.uri = uri
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def free_bytes(self) -> int | None:
        """Free space of a local storage's file system (None for remote storage)."""
        if not self.is_local:
            return None
        path = Path(self.root)
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def check_writable(self) -> None:
        """Fail before the first trial, not after hours of work, when results could not be saved."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            self.makedirs()
            self.write_bytes(b"ok", probe)
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as err:
            raise StorageError(f"cannot write to storage '{self.uri}' ({err.__class__.__name__}: {err}); "
                               f"fix its permissions or free space, or pass another --storage") from None

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, target)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_parquet(self, frame: pd.DataFrame, *parts: str) -> None:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        self.write_bytes(buffer.getvalue(), *parts)

    def read_parquet(self, *parts: str) -> pd.DataFrame:
        return pq.read_table(io.BytesIO(self.read_bytes(*parts))).to_pandas()

    def upload_dir(self, local: Path, *parts: str) -> None:
        """Copy a local directory's files into storage (no-op when it already is that directory)."""
        target = self.path(*parts)
        if self.is_local and Path(target).resolve() == local.resolve():
            return
        for file in local.rglob("*"):
            if file.is_file():
                self.write_bytes(file.read_bytes(), *parts, str(file.relative_to(local)))
