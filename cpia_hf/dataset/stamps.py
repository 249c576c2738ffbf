"""Stamps of the files a run reuses (unit files, published shards): size, modification time, SHA-256.

A file is intact when it has its recorded size and, where its modification time differs from the
recorded one (a write since, a copy, a restore from backup) or when asked to verify, its recorded
SHA-256. A copied or restored output thus reruns by its content, not by its path or times, and a
file written to since it was recorded is never reused unchecked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class FileStamp:
    size: int
    mtime_ns: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns, file_sha256(path))

    @classmethod
    def from_dict(cls, data: dict) -> "FileStamp":
        return cls(int(data["size"]), int(data["mtime_ns"]), str(data["sha256"]))

    def to_dict(self) -> dict:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256}

    def damage(self, path: Path, verify: bool = False) -> str | None:
        """What is wrong with `path` against this stamp, in words that name it; None when it is intact."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"{path}: missing"
        if stat.st_size != self.size:
            return f"{path}: {stat.st_size} bytes, {self.size} recorded"
        if (verify or stat.st_mtime_ns != self.mtime_ns) and file_sha256(path) != self.sha256:
            return f"{path}: content differs from the recorded SHA-256"
        return None

    def refreshed(self, path: Path) -> "FileStamp":
        """This stamp with the file's current time (once its content is verified), so the next run trusts it."""
        return replace(self, mtime_ns=path.stat().st_mtime_ns)


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
