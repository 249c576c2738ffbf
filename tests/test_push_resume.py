"""A dataset push at scale: bounded commits, killed mid-way and resumed without sending finished files again."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from fakehub import COMMIT_MAX_FILES, Fault, fake_hub  # noqa: F401  (pytest fixture)

from cpia_hf import hub
from cpia_hf.dataset.card import REPO_PLACEHOLDER

SUBSETS = ("sa", "sb", "sc")
FILES_PER_SUBSET = 700  # 2,100 shards: 21 commits of 100
LOCAL_ONLY = (".work/progress.json", ".work/units/sa-1.json", "data/full/M/sa/sa-00001.parquet.tmp4242",
              "data/full/M/sb/partial.tmp")


def many_shards_folder(root):
    """A built-dataset folder of 2,100 small shards, its card and files that must stay local."""
    for subset in SUBSETS:
        for index in range(FILES_PER_SUBSET):
            shard = root / "data" / "full" / "M" / subset / f"{subset}-{index:05d}.parquet"
            shard.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"subset": [subset], "license": ["CC-BY-4.0"], "index": [index]}), shard)
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\npretty_name: CPIA\n---\n# CPIA\n\n"
                                    f'load_dataset("{REPO_PLACEHOLDER}")\n')
    (root / "LICENSES.md").write_text("# Licences of the CPIA sources\n")
    for name in LOCAL_ONLY:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"local")
    return root


def cpia_push(folder, fake_hub) -> subprocess.Popen:
    env = {**os.environ, "HF_TOKEN": fake_hub.token, "HF_HOME": str(folder.parent / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.Popen([sys.executable, "-m", "cpia_hf.cli", "push", "--repo", str(folder), "--repo-id",
                             "someone/cpia", "--endpoint", fake_hub.url], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_killed_push_resumes_without_sending_finished_files_again(fake_hub, tmp_path):
    folder = many_shards_folder(tmp_path / "cpia")
    shards = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet"))
    assert len(shards) == 2_100
    # the 8th commit is held open, as a push killed while a commit is in flight sees it
    fake_hub.faults.append(Fault(r"^POST /api/datasets/someone/cpia/commit/", hold=True, after=7))

    first = cpia_push(folder, fake_hub)
    try:
        assert fake_hub.held.wait(timeout=300), first.communicate(timeout=5)
    finally:
        first.kill()  # SIGKILL: no cleanup, no chance to write anything more
        first.communicate()
    fake_hub.faults.clear()
    fake_hub.release.set()
    finished = [path for commit in fake_hub.commits for path in commit["files"]]
    assert len(fake_hub.commits) == 7 and len(finished) == 700
    asked_before = len(fake_hub.preuploaded)

    second = cpia_push(folder, fake_hub)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert "1402 files in 15 commits, 700 already there from an earlier push" in out

    resent = [path for commit in fake_hub.commits[7:] for path in commit["files"]]
    assert not set(resent) & set(finished)  # finished files are not committed again...
    assert not set(fake_hub.preuploaded[asked_before:]) & set(finished)  # ...nor even read and offered again
    assert Counter(finished + resent) == Counter(shards + ["README.md", "LICENSES.md"])  # each file once
    assert max(len(commit["files"]) for commit in fake_hub.commits) <= COMMIT_MAX_FILES
    assert fake_hub.commits[-1]["files"] == ["README.md", "LICENSES.md"]  # the card last, after all the data

    received = fake_hub.received_files("dataset", "someone/cpia")
    assert set(received) == set(shards) | {"README.md", "LICENSES.md"}  # no .work/, *.tmp*, .cache/ files
    assert all(received[path] == (folder / path).read_bytes() for path in shards)
    assert 'load_dataset("someone/cpia")' in received["README.md"].decode()
    assert REPO_PLACEHOLDER in (folder / "README.md").read_text()  # the folder keeps its built card


def small_folder(root, count: int = 30):
    for index in range(count):
        (root / "data" / f"f-{index:03d}.bin").parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / f"f-{index:03d}.bin").write_bytes(b"x" * (index + 1))
    return root


def test_the_resume_log_is_not_trusted_for_a_repo_that_lost_the_files(fake_hub, tmp_path):
    folder = small_folder(tmp_path / "cpia")
    push = dict(repo_type="dataset", token=fake_hub.token, endpoint=fake_hub.url, resumable=True)
    assert len(hub.push_folder(folder, "someone/cpia", **push).sent) == 30
    assert hub.push_folder(folder, "someone/cpia", **push).skipped == [f"data/f-{i:03d}.bin" for i in range(30)]
    for lost in ("data/f-003.bin", "data/f-017.bin"):  # deleted on the Hub since
        (fake_hub.repo_dir("dataset", "someone/cpia") / lost).unlink()
    (folder / "data/f-020.bin").write_bytes(b"changed")  # changed here since
    again = hub.push_folder(folder, "someone/cpia", **push)
    assert again.sent == ["data/f-003.bin", "data/f-017.bin", "data/f-020.bin"]
    assert fake_hub.received_files("dataset", "someone/cpia")["data/f-020.bin"] == b"changed"
    # another repo id has its own log: everything is sent there
    assert len(hub.push_folder(folder, "someone/other", **push).sent) == 30


def test_commits_stay_within_the_per_commit_limits():
    mb = 2**20
    sizes = {f"small-{i}": 9 * mb for i in range(12)} | {f"big-{i}": 600 * mb for i in range(250)}
    commits = hub.plan_commits(sizes)
    assert [path for commit in commits for path in commit] == list(sizes)  # all, in order, once
    for commit in commits:
        assert len(commit) <= hub.COMMIT_MAX_FILES
        assert sum(sizes[p] for p in commit if sizes[p] < hub.INLINE_MAX_FILE_BYTES) <= hub.COMMIT_MAX_INLINE_BYTES
    # 5 small files fill the inline budget (45 of 50 MiB); the last 2 share a commit with 98 large ones
    assert [len(c) for c in commits] == [5, 5, 100, 100, 52]
