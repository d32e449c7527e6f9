"""An append-only JSONL store of records keyed by ``"key"``: what makes a long run resumable.

Every batch of records is written, flushed and fsynced before the next one is computed, so a kill
at any moment loses at most the batch in flight. A line cut short by a crash is dropped (and cut
off the file) when the store is opened again; nothing complete is ever rewritten.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path


class JsonlStore:
    def __init__(self, path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # the last write was interrupted: drop the partial line
            warnings.warn(f"{self.path}: dropping an incomplete last line ({len(data) - end} bytes) left by an "
                          f"interrupted run", stacklevel=3)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for line_no, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(f"{self.path}:{line_no}: unreadable record skipped (it will be recomputed)",
                              stacklevel=3)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: Iterable[dict]) -> None:
        """Write ``records`` durably (flush + fsync), then remember them."""
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["key"]] = r
