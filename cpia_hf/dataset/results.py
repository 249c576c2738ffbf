"""What conversion jobs hand back: a file that failed or gave no row, a run step that failed, a job's outcome."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from .errors import WorkerKilled

T = TypeVar("T")


def is_utf8(file: str) -> bool:
    """Whether a path found on disk decodes as UTF-8 (else Python holds its odd bytes as surrogates)."""
    try:
        file.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(file: str) -> str:
    """A printable form of any path found on disk: bytes that are not UTF-8 written as \\xNN."""
    return os.fsencode(file).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """`text` on one line with nothing a terminal acts on: control characters (newlines, escape sequences) and
    bytes that are not UTF-8 written as backslash escapes, as Python writes them in a string's repr."""
    text = display_name(text) if not is_utf8(text) else text
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def error_text(error: BaseException) -> str:
    """One line for an unexpected error of one file: its type and message, or what an empty message means."""
    text = printable(" ".join(str(error).split()))
    if isinstance(error, MemoryError):
        return f"out of memory while converting it{' (' + text + ')' if text else ''}: give each worker more memory"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass(frozen=True)
class FileNote:
    """A source file and what happened to it; `subset` is filled in where the run gathers every subset's notes."""

    file: str
    reason: str
    subset: str | None = None

    def to_dict(self) -> dict[str, str]:
        """The form kept in unit records (the subset is the record's folder)."""
        return {"file": self.file, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict) -> "FileNote":
        return cls(str(data["file"]), str(data["reason"]))

    def of_subset(self, subset: str) -> "FileNote":
        return replace(self, subset=subset)

    def line(self) -> str:
        return f"[{self.subset}] {printable(self.file)}: {printable(self.reason)}"


class Failure(FileNote):
    """A source file that could not be converted (wholly or in part); retried on every run."""


class Skipped(FileNote):
    """A source file that gave no row without an error (no tissue, too small, not a file)."""


@dataclass(frozen=True)
class StepFailure:
    """A step of the run that failed as a whole (planning a subset's shards, packing, mixing mini)."""

    step: str
    reason: str

    def line(self) -> str:
        return f"{printable(self.step)} failed: {printable(self.reason)}"


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one job gave: its value, or the error that ended it (raised by the job, or its worker's death)."""

    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def reason(self) -> str:
        """The error in one line: a killed worker's words as they are, any other error as its type and message."""
        return str(self.error) if isinstance(self.error, WorkerKilled) else error_text(self.error)
