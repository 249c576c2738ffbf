"""What conversion jobs hand back: a file that failed or gave no row, a run step that failed, a job's outcome."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from .errors import WorkerKilled

T = TypeVar("T")


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
        return f"[{self.subset}] {self.file}: {self.reason}"


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
        return f"{self.step} failed: {self.reason}"


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one job gave: its value, or the error that ended it (raised by the job, or its worker's death)."""

    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def reason(self) -> str:
        """The error in one line: a killed worker's words as they are, any other error as its repr."""
        return str(self.error) if isinstance(self.error, WorkerKilled) else repr(self.error)
