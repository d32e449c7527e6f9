"""What a run wrote in its output folder, so that a rerun or ``--overwrite`` removes exactly that.

A user's own files in ``--out`` (notes, plots, a checkpoint of their own) are never removed: the folder
keeps a manifest, ``OUT/.regap_fast_written.json``, of the files and folders that runs of this library
created there, rewritten as the run goes (at every checkpoint and when it ends, also by an error), and
only what it lists is ever deleted. Readable without torch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("regap_fast.train")

MANIFEST = ".regap_fast_written.json"


def _walk(root: Path) -> tuple[set[str], set[str]]:
    """(files, folders) under root, as POSIX paths relative to it; the manifest itself left out."""
    files, dirs = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirs.update((rel / d).as_posix() for d in dirnames)
        files.update((rel / f).as_posix() for f in filenames)
    files.discard(MANIFEST)
    return files, dirs


def _summary(paths: list[str], limit: int = 4) -> str:
    """``a, b/, c, ... (12 files)``: top-level names of what was removed."""
    tops = sorted({p.split("/")[0] + ("/" if "/" in p else "") for p in paths})
    return ", ".join(tops[:limit]) + (", ..." if len(tops) > limit else "") + f" ({len(paths)} files)"


class OutputFolder:
    """The output folder of one run. ``begin()`` before writing, ``record()`` whenever the run has written
    something worth keeping track of, ``discard()`` to take back everything this run wrote."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._before: tuple[set[str], set[str]] = (set(), set())  # not ours: the user's
        self._earlier: tuple[set[str], set[str]] = (set(), set())  # earlier runs' (a resumed run's own)
        self._created_root = False

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def written(self) -> tuple[list[str], list[str]]:
        """(files, folders) the manifest lists: what earlier runs wrote here."""
        try:
            data = json.loads(self.manifest.read_text())
            return list(data.get("files", [])), list(data.get("folders", []))
        except (OSError, ValueError):
            return [], []

    def remove_previous(self, keep: Callable[[str], bool] = lambda path: False) -> list[str]:
        """Delete the files (and then the emptied folders) an earlier run wrote, except those ``keep``
        accepts; returns the removed files. Anything the manifest does not list stays."""
        files, folders = self.written()
        removed, kept = [], []
        for rel in files:
            if keep(rel):
                kept.append(rel)
                continue
            path = self.root / rel
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(rel)
        for rel in sorted(folders, key=lambda p: p.count("/"), reverse=True):  # deepest first
            try:
                (self.root / rel).rmdir()  # only when empty: a user's file inside keeps its folder
            except OSError:
                pass
        if kept:
            self._write(kept, [f for f in folders if (self.root / f).is_dir()])
        elif self.manifest.exists():
            self.manifest.unlink()
        if removed:
            log.warning("removed what an earlier run wrote in %s: %s", self.root, _summary(removed))
        return removed

    def begin(self) -> None:
        """Take note of what is there before this run writes anything (the user's files, a kept cache)."""
        self._created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        files, dirs = _walk(self.root)
        old_files, old_dirs = map(set, self.written())
        self._earlier = (files & old_files, dirs & old_dirs)
        self._before = (files - old_files, dirs - old_dirs)

    def record(self) -> None:
        """Rewrite the manifest: what earlier runs wrote (still there) and what this run has written."""
        if not self.root.is_dir():
            return
        files, dirs = _walk(self.root)
        before_files, before_dirs = self._before
        self._write(sorted(files - before_files), sorted(dirs - before_dirs))

    def discard(self) -> list[str]:
        """Remove what this run wrote (not what earlier runs wrote: a resumed run's checkpoints stay); the
        folder too when this run created it and nothing is left in it. For a run that failed before its
        first step."""
        self.record()
        earlier_files, _ = self._earlier
        removed = self.remove_previous(keep=lambda rel: rel in earlier_files)
        if self._created_root:
            try:
                self.root.rmdir()
            except OSError:
                pass
        return removed

    def _write(self, files: Iterable[str], folders: Iterable[str]) -> None:
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"what": "files and folders regap_fast wrote here; a rerun or --overwrite "
                                           "removes only these", "files": list(files), "folders": list(folders)},
                                  indent=1))
        os.replace(tmp, self.manifest)
