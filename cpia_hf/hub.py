"""Push a built dataset folder or an exported model folder to the Hugging Face Hub.

A push sends the folder in commits of at most ``COMMIT_MAX_FILES`` files (and ``COMMIT_MAX_INLINE_BYTES``
of small files, which travel inside the commit). A dataset push records every finished commit in a log
under the folder's ``.cache/huggingface/`` (never uploaded): a rerun after an interruption skips the
files that log and the repo both hold, unchanged, without reading them again; an unfinished commit is
sent again (the Hub's xet storage deduplicates what already reached it).

Requests the Hub may answer later (429, 5xx, no connection) are tried again after each of ``RETRY_WAITS``.
Every failure at the Hub boundary (no token, offline mode, no network, an HTTP error after the retries)
becomes one ``HubError`` line that names the repo and says what to do.

huggingface_hub 2.x has no ``upload_large_folder`` any more, and its ``upload_folder`` resumes by reading
and hashing every file again (6.4 TB for the release) with commits of up to 1,000 files; hence the
bounded commits of ``create_commit`` here and the log of finished ones.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Literal, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from tqdm.auto import tqdm

from .atomic import TEMP_GLOB

try:  # the HTTP client of huggingface_hub 2.x; 1.x used httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http

RepoType = Literal["dataset", "model"]

# Hub repository limits (https://huggingface.co/docs/hub/repositories-recommendations): beyond them, repos
# become slow or fail to update, so a folder over them is refused before anything is sent.
HUB_MAX_FILES = 100_000  # files per repo
HUB_MAX_FOLDER_ENTRIES = 10_000  # files and subfolders directly in one folder
COMMIT_MAX_FILES = 100  # files per commit (the Hub's recommendation for commits made over HTTP)
COMMIT_MAX_INLINE_BYTES = 50 * 2**20  # small files travel base64-encoded in the commit request itself
INLINE_MAX_FILE_BYTES = 10 * 2**20  # larger files always go through LFS / xet storage, not the commit
DATASET_IGNORE_PATTERNS = [".work/**", "*.tmp", TEMP_GLOB]  # work files and unfinished writes
PUSH_LOG_DIR = ".cache/huggingface/cpia-push"  # under the pushed folder; DEFAULT_IGNORE_PATTERNS keeps it local
RETRY_WAITS = (1, 2, 4, 8, 16)  # seconds between tries of a request the Hub may answer later (429, 5xx, network)
T = TypeVar("T")
logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A push or access check that failed at the Hub boundary; str() is one line: repo, cause, what to do."""


@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    repo_type: RepoType = "dataset"
    endpoint: str | None = None  # None: HF_ENDPOINT or huggingface.co
    private: bool | None = True  # None: the Hub's default for the namespace

    @property
    def label(self) -> str:
        return f"{self.repo_type} repo {self.repo_id}"

    @property
    def host(self) -> str:
        return self.endpoint or constants.ENDPOINT


@dataclass
class PushResult:
    url: str
    sent: list[str] = field(default_factory=list)  # repo paths committed by this push
    skipped: list[str] = field(default_factory=list)  # already in the repo from an earlier, interrupted push
    commits: int = 0

    def __str__(self) -> str:  # prints as the repo URL
        return self.url


STATUS_ADVICE = {
    401: "the token was refused: set HF_TOKEN to a valid token or run `hf auth login --force`",
    403: "the token may not write there: use a token with write access to that namespace, or a namespace you own",
    404: "not found: check the repo id (namespace/name) and that the namespace exists",
    409: "conflict: the repo changed during the push (another push, or a repo of another type); try again",
    429: f"rate-limited by the Hub after {len(RETRY_WAITS)} retries: wait a few minutes, then try again",
}


def hub_error(error: BaseException, target: HubTarget) -> HubError:
    """The one-line HubError for an exception raised while talking to the Hub."""
    where = f"{target.label} at {target.host}"
    if isinstance(error, HubError):
        return error
    if isinstance(error, OfflineModeIsEnabled) or constants.is_offline_mode():
        return HubError(f"{where}: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and try again")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        advice = STATUS_ADVICE.get(status) or (
            f"the Hub failed (HTTP {status}) after {len(RETRY_WAITS)} retries: try again later" if status >= 500
            else f"the Hub refused the request (HTTP {status}): {_server_message(error)}")
        return HubError(f"{where}: {advice}")
    if isinstance(error, (_http.TransportError, ConnectionError, TimeoutError)):
        return HubError(f"{where}: cannot reach the Hub ({type(error).__name__}, after {len(RETRY_WAITS)} retries); "
                        "check the network (or --endpoint / HF_ENDPOINT), then try again")
    return HubError(f"{where}: {type(error).__name__}: {' '.join(str(error).split())}")


def _server_message(error: HfHubHTTPError) -> str:
    message = getattr(error, "server_message", None) or str(error)
    return " ".join(message.split())[:200]


@contextmanager
def quiet_library() -> Iterator[None]:
    """Keep huggingface_hub's retry warnings off stderr (the failure, if any, is reported as one line);
    `cpia -v` (root logger at INFO) shows them."""
    library = logging.getLogger("huggingface_hub")
    level = library.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        library.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library.setLevel(level)


def _transient(error: BaseException) -> bool:
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        return status == 429 or status >= 500
    return isinstance(error, (_http.TransportError, ConnectionError, TimeoutError))


def retrying(call: Callable[[], T]) -> T:
    """`call()`, tried again after each of RETRY_WAITS while it fails in a way the Hub may not repeat.

    Retrying a commit whose answer was lost is harmless: the Hub reports the files as unchanged and the
    library sends nothing for them.
    """
    for wait in RETRY_WAITS:
        try:
            return call()
        except Exception as error:  # noqa: BLE001  only transient ones are retried
            if not _transient(error):
                raise
            logger.info("%s; retrying in %s s", " ".join(str(error).split())[:200], wait)
        time.sleep(wait)
    return call()


def connect(target: HubTarget, token: str | None = None) -> HfApi:
    """An HfApi for `target` with a token; HubError when offline mode is on or there is no token."""
    if constants.is_offline_mode():
        raise hub_error(OfflineModeIsEnabled(), target)
    token = token or get_token()
    if not token:
        raise HubError(f"{target.label}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    return HfApi(endpoint=target.endpoint, token=token)


def check_write_access(target: HubTarget, token: str | None = None) -> HfApi:
    """Check that the token is valid and may write `target`, creating the repo if needed; returns the HfApi.

    Cheap (two requests): the training and export commands run it before any work, so that a bad
    token or a wrong repo id fails in seconds, not after hours of training.
    """
    api = connect(target, token)
    try:
        with quiet_library():
            identity = retrying(api.whoami)
        if not _may_write(identity, target.repo_id):
            raise HubError(f"{target.label} at {target.host}: the token of {identity.get('name', '?')} is "
                           "read-only there; create a token with write access (hf.co/settings/tokens)")
        with quiet_library():
            retrying(lambda: api.create_repo(target.repo_id, repo_type=target.repo_type, private=target.private,
                                             exist_ok=True))
    except Exception as error:  # noqa: BLE001  every failure at the boundary becomes one line
        raise hub_error(error, target) from error
    return api


def _may_write(identity: dict, repo_id: str) -> bool:
    """Whether whoami's token description allows writing `repo_id` (classic write tokens, or a fine-grained
    token with repo.write on the repo or its namespace)."""
    token = (identity.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role != "fineGrained":
        return role != "read"
    grants = (token.get("fineGrained") or {}).get("scoped") or []
    names = {repo_id, repo_id.split("/")[0]}
    return any("repo.write" in g.get("permissions", []) and (g.get("entity") or {}).get("name") in names
               for g in grants)


def require_push_access(repo_id: str | None, repo_type: RepoType, *, endpoint: str | None, private: bool | None,
                        command: str) -> None:
    """For commands that push at their end: check the token and write access now; on failure print one
    line and exit with status 2 (SystemExit), before any work is done. Nothing happens when `repo_id` is None."""
    if not repo_id:
        return
    try:
        check_write_access(HubTarget(repo_id, repo_type, endpoint, private))
    except HubError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def files_to_upload(folder: Path, ignore_patterns: list[str] | None = None) -> list[str]:
    """Repo paths of the files of `folder` that a push sends, with the same filtering as ``upload_folder``."""
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=[*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]))


def check_hub_limits(folder: Path, paths: list[str]) -> None:
    """Raise ValueError if ``paths`` break the Hub's file-count limits, naming the offending folder."""
    if len(paths) >= HUB_MAX_FILES:
        raise ValueError(f"{folder}: {len(paths):,} files to upload, a Hub repo holds fewer than "
                         f"{HUB_MAX_FILES:,}; pack them into fewer, larger files (e.g. parquet shards)")
    entries = defaultdict(set)
    for path in paths:
        parts = PurePosixPath(path).parts
        for depth, name in enumerate(parts):
            entries["/".join(parts[:depth])].add(name)
    for parent, names in sorted(entries.items()):
        if len(names) >= HUB_MAX_FOLDER_ENTRIES:
            raise ValueError(f"{folder / parent}: {len(names):,} entries, a Hub folder holds fewer than "
                             f"{HUB_MAX_FOLDER_ENTRIES:,}; split it into subfolders")


def plan_commits(sizes: dict[str, int], max_files: int | None = None,
                 max_inline_bytes: int | None = None) -> list[list[str]]:
    """Split repo paths (in order) into commits within the per-commit limits: at most `max_files` files and
    `max_inline_bytes` of files small enough to travel inside the commit."""
    max_files = max_files or COMMIT_MAX_FILES
    max_inline_bytes = max_inline_bytes or COMMIT_MAX_INLINE_BYTES
    commits: list[list[str]] = []
    inline = 0
    for path, size in sizes.items():
        small = size if size < INLINE_MAX_FILE_BYTES else 0
        if not commits or len(commits[-1]) >= max_files or (commits[-1] and inline + small > max_inline_bytes):
            commits.append([])
            inline = 0
        commits[-1].append(path)
        inline += small
    return commits


class PushLog:
    """What earlier pushes of a folder to one repo committed: one JSON line per commit, appended when the
    Hub has confirmed it ({"commit": oid, "files": {path: [size, mtime_ns]}})."""

    def __init__(self, folder: Path, target: HubTarget):
        host = target.host.split("://")[-1].replace(":", "_").replace("/", "_")
        self.path = folder / PUSH_LOG_DIR / host / f"{target.repo_type}s" / f"{target.repo_id}.jsonl"

    def committed(self) -> dict[str, tuple[int, int]]:
        """Repo path -> (size, mtime_ns) as committed; a line cut short by a kill is ignored."""
        files: dict[str, tuple[int, int]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    files.update({p: tuple(v) for p, v in json.loads(line)["files"].items()})
                except (ValueError, KeyError, TypeError):
                    continue
        return files

    def record(self, commit: str, files: dict[str, tuple[int, int]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as log:
            log.write(json.dumps({"commit": commit, "files": files}) + "\n")
            log.flush()
            os.fsync(log.fileno())


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def already_pushed(api: HfApi, target: HubTarget, log: PushLog, stamps: dict[str, tuple[int, int]]) -> set[str]:
    """Paths whose local file is unchanged since the log recorded its commit and which the repo still holds
    at that size (a repo deleted or rewritten since is not trusted)."""
    logged = {p for p, stamp in log.committed().items() if stamps.get(p) == stamp}
    if not logged:
        return set()
    tree = retrying(lambda: list(api.list_repo_tree(target.repo_id, repo_type=target.repo_type, recursive=True)))
    remote = {f.path: f.size for f in tree if hasattr(f, "size")}
    return {p for p in logged if remote.get(p) == stamps[p][0]}


def _operations(folder: Path, paths: list[str], replacements: dict[str, bytes]) -> Iterator[CommitOperationAdd]:
    for path in paths:
        content = replacements[path] if path in replacements else folder / path
        yield CommitOperationAdd(path_in_repo=path, path_or_fileobj=content)


def push_folder(folder: Path, repo_id: str, *, repo_type: RepoType = "dataset", private: bool | None = True,
                commit_message: str = "Upload with cpia-hf", ignore_patterns: list[str] | None = None,
                token: str | None = None, endpoint: str | None = None,
                replacements: dict[str, bytes] | None = None, resumable: bool = False) -> PushResult:
    """Create `repo_id` if needed and upload `folder` into it in bounded commits.

    `replacements` (repo path -> bytes) are sent instead of the local files of those names (the card
    rendered for this repo), in the last commit, so a repo never shows a card before its data. With
    `resumable`, finished commits are logged under the folder and skipped by a rerun. The token comes from
    `token`, else HF_TOKEN or the saved login; it is only sent in request headers. Raises ValueError for a
    folder over the Hub's limits (before any request) and HubError for any failure at the Hub.
    """
    folder = Path(folder)
    replacements = dict(replacements or {})
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    if repo_type not in ("dataset", "model"):
        raise ValueError(f"repo_type must be 'dataset' or 'model', not {repo_type!r}")
    paths = [p for p in files_to_upload(folder, ignore_patterns) if p not in replacements]
    if not paths:
        raise ValueError(f"{folder}: no files to upload")
    check_hub_limits(folder, paths + list(replacements))
    target = HubTarget(repo_id, repo_type, endpoint, private)
    api = check_write_access(target, token)
    stamps = {p: _stamp(folder / p) for p in paths}
    log = PushLog(folder, target) if resumable else None
    result = PushResult(url=_repo_url(api, target))
    try:
        with quiet_library():
            done = already_pushed(api, target, log, stamps) if log else set()
            result.skipped = [p for p in paths if p in done]
            commits = plan_commits({p: stamps[p][0] for p in paths if p not in done})
            commits += plan_commits({p: len(content) for p, content in replacements.items()})
            bar = tqdm(total=sum(map(len, commits)), unit="file", desc=f"push {repo_id}", disable=None)  # TTY only
            for index, batch in enumerate(commits):
                message = commit_message if len(commits) == 1 else f"{commit_message} ({index + 1}/{len(commits)})"
                operations = list(_operations(folder, batch, replacements))
                info = retrying(lambda: api.create_commit(repo_id, operations, commit_message=message,
                                                          repo_type=repo_type))
                if log:
                    log.record(info.oid, {p: stamps[p] for p in batch if p in stamps})
                result.sent += batch
                result.commits += 1
                bar.update(len(batch))
            bar.close()
    except Exception as error:  # noqa: BLE001  every failure at the boundary becomes one line
        raise hub_error(error, target) from error
    return result


def _repo_url(api: HfApi, target: HubTarget) -> str:
    prefix = "" if target.repo_type == "model" else f"{target.repo_type}s/"
    return f"{api.endpoint}/{prefix}{target.repo_id}"
