"""What a run added to the data cache, so that a run refused for its data leaves the cache as it was."""

from __future__ import annotations

import contextlib
import os
import shutil


class Written:
    """What a run added to the cache, in order: folders it made (removed if empty) and entries it wrote (token
    shards, a trained tokenizer, remembered file hashes: removed). `undo()` removes them, newest first. Only
    what this process itself renamed into place is recorded, never an identical entry another process wrote."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, bool]] = []  # (path, whole entry) ; else a folder made for entries

    def folders(self, path: str) -> None:
        """Make `path` and its missing parents, remembering the ones made."""
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
                self.paths.append((folder, False))

    def add(self, path: str) -> None:
        """Remember an entry (file or folder) this process renamed into place."""
        self.paths.append((path, True))

    def undo(self) -> None:
        for path, whole in reversed(self.paths):
            with contextlib.suppress(OSError):
                if not whole:
                    os.rmdir(path)  # a folder another writer now uses is not empty: kept
                elif os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        self.paths.clear()
