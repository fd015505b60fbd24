"""metrics.jsonl: one line per epoch record, always, whoever writes it and however often.

    rebuild_metrics(path, history, upto=epoch)   # a run (re)starts: the start checkpoint's history
    add_metric(path, record)                     # an epoch record, replacing one of the same epoch

A record is keyed by its epoch (and `epoch_batches` for a record of a run stopped mid-epoch), so a
record written twice -- an epoch trained again after a restart, a record re-emitted from a checkpoint
-- stays one line. The file is rewritten whole (a temporary file renamed into place): a reader never
sees half a line, and a crash leaves the previous file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _key(record: dict) -> tuple[int, int]:
    # a mid-epoch record ("epoch" completed epochs + epoch_batches) sorts after its epoch's record
    return int(record["epoch"]), int(record.get("epoch_batches", 0))


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl (unreadable lines skipped), one per key, in epoch order."""
    records: dict[tuple[int, int], dict] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            r = json.loads(line)
            records[_key(r)] = r  # the last line of a key wins
        except (ValueError, KeyError, TypeError):
            continue
    return [records[k] for k in sorted(records)]


def _write(path: Path, records: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def rebuild_metrics(path: Path, history: list[dict] | None, *, upto: int) -> None:
    """Make metrics.jsonl the records of epochs <= `upto` (the start checkpoint's epoch): `history`
    (the records the checkpoint carries), else the file's own; later lines belong to a history this
    run does not continue."""
    records = {_key(r): r for r in read_metrics(path)}
    records.update({_key(r): r for r in history or []})
    _write(path, [records[k] for k in sorted(records) if k[0] <= upto])


def add_metric(path: Path, record: dict) -> None:
    """Add one epoch record, replacing any of the same key."""
    records = {_key(r): r for r in read_metrics(path)}
    records[_key(record)] = record
    _write(path, [records[k] for k in sorted(records)])
