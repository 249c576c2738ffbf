"""Push a built dataset folder or an exported model folder to the Hugging Face Hub."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .atomic import TEMP_GLOB

# Hub repository limits (https://huggingface.co/docs/hub/storage-limits): beyond them, repos become
# slow or fail to update, so a folder over them is refused before anything is sent.
HUB_MAX_FILES = 100_000  # files per repo
HUB_MAX_FOLDER_ENTRIES = 10_000  # files and subfolders directly in one folder
DATASET_IGNORE_PATTERNS = [".work/**", "*.tmp", TEMP_GLOB]  # work files and unfinished writes


def files_to_upload(folder: Path, ignore_patterns: list[str] | None = None) -> list[str]:
    """Repo paths that ``upload_folder`` would send, with the same filtering."""
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


def push_folder(folder: Path, repo_id: str, *, repo_type: str = "dataset", private: bool = False,
                commit_message: str = "Upload with cpia-hf", ignore_patterns: list[str] | None = None,
                token: str | None = None, endpoint: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` into it; returns the repo URL.

    ``repo_type`` is "dataset" or "model". The token comes from ``token``, else from HF_TOKEN or
    the saved login (``huggingface_hub.get_token``); it is only sent in request headers. Uploads go
    through ``HfApi.upload_folder``: with hf_xet installed it uploads and commits in batches, and
    re-running the same call after an interruption resumes it (committed files are skipped,
    uploaded chunks deduplicated).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    if repo_type not in ("dataset", "model"):
        raise ValueError(f"repo_type must be 'dataset' or 'model', not {repo_type!r}")
    paths = files_to_upload(folder, ignore_patterns)
    if not paths:
        raise ValueError(f"{folder}: no files to upload")
    check_hub_limits(folder, paths)
    token = token or get_token()
    if not token:
        raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type,
                      commit_message=commit_message, ignore_patterns=list(ignore_patterns or []))
    return str(repo_url)
