"""Read W&B offline runs (``offline-run-*`` folders) without a W&B server.

An offline run keeps its data only in ``run-<id>.wandb``, a LevelDB-style log of protobuf
``Record`` messages, and wandb ships no reader for it. The format, as written by wandb 0.31:

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version 0;
* then 32 KiB blocks counted from the start of the file; each chunk has a 7-byte header
  (CRC-32 uint32 LE, length uint16 LE, type byte) and its payload; a record that does not fit in
  the rest of a block is split into FIRST/MIDDLE/LAST chunks, a whole one is FULL; a block tail
  shorter than a chunk header is zero padding;
* the CRC is zlib's CRC-32 of the payload, seeded with the CRC-32 of the type byte.

wandb-core (the service process) buffers that log: it writes whole 32 KiB blocks, a partial block
only about every 15 s and when the run's stream closes. So ``run.finish()`` returns before the log
is on disk (:func:`wait_complete` waits for the exit record), and a service that dies without
closing the stream leaves only what it had flushed (often the bare header).
Tables and media are JSON/image files under the run's ``files/`` folder; history and summary hold
references (``{"_type": "table-file", "path": ...}``) that :func:`read_offline_run` resolves.
"""
from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}


class CorruptLogError(ValueError):
    """The file is not a W&B record log, or a chunk fails its checksum."""


@dataclass
class OfflineRun:
    """What an offline run recorded. ``history`` has one dict per logged step (``_step`` included)."""

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    finished: bool = False
    exit_code: int | None = None


def iter_chunks(data: bytes) -> Iterator[bytes]:
    """Payloads of the log's records, reassembled from their chunks.

    A truncated tail (a run still writing, or killed mid-write) ends the iteration quietly.
    """
    if len(data) < HEADER.size:
        raise CorruptLogError("file is shorter than the W&B log header")
    ident, magic, version = HEADER.unpack_from(data)
    if ident != IDENT or magic != MAGIC or version != VERSION:
        raise CorruptLogError(f"not a W&B record log (header {data[:HEADER.size]!r})")
    pos, pending = HEADER.size, bytearray()
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer padding
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled (preallocated or padded) space
            pos += left
            continue
        start = pos + CHUNK.size
        if start + length > len(data):
            return
        payload = data[start:start + length]
        if kind not in _TYPE_CRC or zlib.crc32(payload, _TYPE_CRC[kind]) != crc:
            raise CorruptLogError(f"bad chunk at byte {pos} (type {kind}, length {length})")
        pos = start + length
        if kind == FULL:
            yield bytes(payload)
        elif kind == FIRST:
            pending = bytearray(payload)
        else:
            pending += payload
            if kind == LAST:
                yield bytes(pending)
                pending = bytearray()


def iter_records(path: Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_chunks(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def log_file(run_dir: str | Path) -> Path | None:
    """The ``run-<id>.wandb`` record log of a run folder, None when there is none yet."""
    logs = sorted(Path(run_dir).glob("run-*.wandb"))
    return logs[0] if logs else None


def is_complete(run_dir: str | Path) -> bool:
    """Whether the run's log already holds its exit record.

    ``run.finish()`` returns before wandb's service has flushed an offline log (measured with wandb
    0.31: often only the 7-byte header is on disk at that moment), so readers wait for this.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = log_file(run_dir)
    if path is None:
        return False
    try:
        for payload in iter_chunks(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.HasField("exit"):
                return True
    except (OSError, CorruptLogError):
        return False
    return False


def wait_complete(run_dir: str | Path, timeout: float = 15.0) -> bool:
    """Poll until :func:`is_complete` or ``timeout`` seconds pass; returns whether it completed."""
    deadline = time.monotonic() + timeout
    while not is_complete(run_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _key_path(item: Any) -> list[str]:
    # wandb-core writes flat keys as a one-element nested_key, nested dicts as longer paths.
    return list(item.nested_key) or [item.key]


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    target[path[-1]] = value


def _remove(target: dict[str, Any], path: list[str]) -> None:
    for part in path[:-1]:
        target = target.get(part)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _apply(target: dict[str, Any], record: Any) -> None:
    """Apply a config or summary record's ``update`` and ``remove`` items to ``target``."""
    for item in record.update:
        _set(target, _key_path(item), json.loads(item.value_json))
    for item in record.remove:
        _remove(target, _key_path(item))


def _history_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value")
    if which is None or which == "none":
        return None
    value = getattr(item, which)
    return json.loads(value) if which == "json" else value


def _tables(values: dict[str, Any], files_dir: Path, out: dict[str, dict[str, list]]) -> None:
    """Load every table file referenced in ``values`` (later references replace earlier ones)."""
    for key, value in values.items():
        if isinstance(value, dict) and value.get("_type") in ("table-file", "incremental-table-file"):
            path = files_dir / str(value.get("path", ""))
            if path.is_file():
                table = json.loads(path.read_text())
                out[key] = {"columns": table.get("columns", []), "data": table.get("data", [])}


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Read an ``offline-run-*`` (or ``run-*``) folder: run fields, config, history, summary, tables."""
    run_dir = Path(run_dir)
    path = log_file(run_dir)
    if path is None:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run = OfflineRun(path=run_dir)
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            _apply(run.config, r.config)
        elif kind == "config":
            _apply(run.config, record.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _key_path(item), _history_value(item))
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, record.summary)
        elif kind == "exit":
            run.finished, run.exit_code = True, record.exit.exit_code
    # wandb's own bookkeeping, not the user's config or results.
    run.config.pop("_wandb", None)
    run.summary.pop("_wandb", None)
    files_dir = run_dir / "files"
    for row in run.history:
        _tables(row, files_dir, run.tables)
    _tables(run.summary, files_dir, run.tables)
    if files_dir.is_dir():
        run.files = sorted(p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*") if p.is_file())
    return run


def find_offline_runs(wandb_dir: str | Path) -> list[Path]:
    """The ``offline-run-*`` folders directly under ``wandb_dir``, oldest first."""
    wandb_dir = Path(wandb_dir)
    if not wandb_dir.is_dir():
        return []
    return sorted(p for p in wandb_dir.glob("offline-run-*") if p.is_dir() and not p.is_symlink())
