"""Run-level robustness of `cpia convert`: killed workers, reruns after fixes, output errors, damaged shards,
the output lock, what is skipped, and the coverage table against the release."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cpia_hf.atomic import TEMP_GLOB
from cpia_hf.cli import main
from cpia_hf.dataset import units
from cpia_hf.demo.synth import he_like_image, write_slide

COMMON = {"organ": "breast", "disease": "unknown", "stain": "H&E", "field": "histopathology",
          "license": "unknown", "homepage": "unknown", "citation": "unknown"}


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".work" not in p.parts}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small slides (one of them `poison.svs`) and three ROIs, with their catalog."""
    root = tmp_path_factory.mktemp("sources")
    (root / "wsi").mkdir()
    (root / "roi").mkdir()
    for k, name in enumerate(("a", "poison", "c")):
        write_slide(root / "wsi" / f"{name}.svs", he_like_image(1024, 1024, seed=k, tissue=0.9), 0.5)
    for k in range(3):
        Image.fromarray(he_like_image(300, 200, seed=10 + k)).save(root / "roi" / f"ok_{k}.png")
    (root / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "w", "kind": "wsi", "path": "wsi", "pattern": "*.svs", **COMMON},
        {"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", **COMMON},
    ]}))
    return root


def convert_cli(sources: Path, out: Path, *extra: str) -> int:
    return main(["convert", "--catalog", str(sources / "catalog.yaml"), "--source-root", str(sources),
                 "--out", str(out), "--no-progress", *extra])


def source_files(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {f for p in (out / "data" / "full").rglob("*.parquet") for f in pq.read_table(p, columns=["source_file"])
            .column("source_file").to_pylist()}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_killed_worker_costs_only_its_unit(sources: Path, tmp_path: Path, monkeypatch, capsys, workers: str) -> None:
    real = units._wsi_items
    calls = tmp_path / "calls"
    calls.mkdir()

    def poisoned(unit, *args):
        if "poison" in unit.files[0]:
            (calls / str(os.getpid())).touch()
            os.kill(os.getpid(), 9)
        return real(unit, *args)

    monkeypatch.setattr(units, "_wsi_items", poisoned)
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--workers", workers) == 1
    err = capsys.readouterr().err
    assert "wsi/poison.svs: worker killed, signal 9 (SIGKILL), probably out of memory" in err
    assert len(list(calls.iterdir())) == 2  # tried, then retried once alone
    assert source_files(out) == {"wsi/a.svs", "wsi/c.svs", "roi/ok_0.png", "roi/ok_1.png", "roi/ok_2.png"}
    assert (out / "README.md").exists()
    assert list(out.rglob(TEMP_GLOB)) == []  # the killed worker's unfinished unit file is gone


def roi_batch(root: Path, names: list[str]) -> Path:
    """One ROI chunk of the given PNG files, with its catalog."""
    (root / "roi").mkdir(parents=True)
    for k, name in enumerate(names):
        Image.fromarray(he_like_image(120 + 10 * k, 100, seed=30 + k)).save(root / "roi" / name)
    (root / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", **COMMON}]}))
    return root


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_file_that_kills_its_worker_costs_only_itself(tmp_path: Path, monkeypatch, capsys, workers: str) -> None:
    names = [f"ok_{k}.png" for k in range(9)]
    names.insert(6, "ok_5_killer.png")  # in the middle of the chunk
    sources = roi_batch(tmp_path / "sources", names)
    real = units.convert_roi
    converted = tmp_path / "converted"  # each conversion of a file leaves a mark (workers are processes)
    converted.mkdir()

    def killing(path, **kwargs):
        if path.name == "ok_5_killer.png":
            os.kill(os.getpid(), 9)
        (converted / f"{path.name}-{os.getpid()}-{time.monotonic_ns()}").touch()
        return real(path, **kwargs)

    monkeypatch.setattr(units, "convert_roi", killing)
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--workers", workers) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"FAILED: 1 file(s) could not be converted (the rest was; listed in "
                        f"{out.absolute() / '.work' / 'failures.csv'}):",
                        "  [r] roi/ok_5_killer.png: worker killed, signal 9 (SIGKILL), probably out of memory"]
    assert source_files(out) == {f"roi/{name}" for name in names if name != "ok_5_killer.png"}
    clean = tmp_path / "clean"  # the same chunk without the killer
    (tmp_path / "sources" / "roi" / "ok_5_killer.png").rename(tmp_path / "ok_5_killer.png")
    monkeypatch.setattr(units, "convert_roi", real)
    assert convert_cli(sources, clean) == 0
    assert {k: v for k, v in tree_digest(out).items() if k.startswith("data/")} == \
        {k: v for k, v in tree_digest(clean).items() if k.startswith("data/")}
    assert sorted(p.name for p in (out / ".work" / "units" / "r").iterdir()) == ["roi-00000.json", "roi-00000.parquet"]
    # a rerun converts only the killer again, and names it alone
    (tmp_path / "ok_5_killer.png").rename(tmp_path / "sources" / "roi" / "ok_5_killer.png")
    monkeypatch.setattr(units, "convert_roi", killing)
    for mark in converted.iterdir():
        mark.unlink()
    capsys.readouterr()
    assert convert_cli(sources, out, "--workers", workers) == 1
    assert capsys.readouterr().err.splitlines()[-1] == \
        "  [r] roi/ok_5_killer.png: worker killed, signal 9 (SIGKILL), probably out of memory"
    assert list(converted.iterdir()) == []
    # once the file no longer kills, it converts and the output is a clean run's
    monkeypatch.setattr(units, "convert_roi", real)
    assert convert_cli(sources, out) == 0
    whole = tmp_path / "whole"
    assert convert_cli(sources, whole) == 0
    assert tree_digest(out) == tree_digest(whole)


def test_failed_file_is_retried_on_rerun(sources: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real = units.convert_roi

    def unreadable(path, **kwargs):
        if path.name == "ok_1.png":
            raise units.RoiError(path, "unreadable image: [Errno 13] Permission denied")
        return real(path, **kwargs)

    monkeypatch.setattr(units, "convert_roi", unreadable)
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--subsets", "r") == 1
    assert "roi/ok_1.png: unreadable image" in capsys.readouterr().err
    assert source_files(out) == {"roi/ok_0.png", "roi/ok_2.png"}
    converted = tmp_path / "converted"  # conversions run in worker processes: they leave a mark each
    converted.mkdir()

    def fixed(path, **kwargs):  # the file is fixed; its size and time are unchanged
        (converted / path.name).touch()
        return real(path, **kwargs)

    monkeypatch.setattr(units, "convert_roi", fixed)
    assert convert_cli(sources, out, "--subsets", "r") == 0
    assert [p.name for p in converted.iterdir()] == ["ok_1.png"]  # the chunk's other files: cached rows
    monkeypatch.setattr(units, "convert_roi", real)
    assert source_files(out) == {"roi/ok_0.png", "roi/ok_1.png", "roi/ok_2.png"}
    clean = tmp_path / "clean"
    assert convert_cli(sources, clean, "--subsets", "r") == 0
    assert tree_digest(out) == tree_digest(clean)


def test_changed_file_invalidates_its_record(sources: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "sources"
    (copy / "roi").mkdir(parents=True)
    for k in range(2):
        (copy / "roi" / f"ok_{k}.png").write_bytes((sources / "roi" / f"ok_{k}.png").read_bytes())
    (copy / "catalog.yaml").write_text((sources / "catalog.yaml").read_text())
    out = tmp_path / "out"
    assert convert_cli(copy, out, "--subsets", "r") == 0
    Image.fromarray(he_like_image(300, 200, seed=99)).save(copy / "roi" / "ok_1.png")  # re-downloaded, new content
    assert convert_cli(copy, out, "--subsets", "r") == 0
    assert "(0 already done)" in capsys.readouterr().out
    clean = tmp_path / "clean"
    assert convert_cli(copy, clean, "--subsets", "r") == 0
    assert tree_digest(out) == tree_digest(clean)


def test_disk_full_is_one_line_and_leaves_no_temp_file(sources: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from cpia_hf.dataset import shards

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_shard_table", full_disk)
    out = tmp_path / "out"
    assert convert_cli(sources, out) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cpia convert: error: cannot write {out}/data/full/")
    assert lines[0].endswith(".parquet: [Errno 28] No space left on device")
    assert list(out.rglob(TEMP_GLOB)) == []
    monkeypatch.undo()  # space again: the rerun completes and equals a clean run byte for byte
    assert convert_cli(sources, out) == 0
    clean = tmp_path / "clean"
    assert convert_cli(sources, clean) == 0
    assert tree_digest(out) == tree_digest(clean)


def test_read_only_output_is_one_line(sources: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import pyarrow.parquet as pq

    def read_only(where, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(pq, "ParquetWriter", read_only)
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--workers", "2") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() ]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cpia convert: error: cannot write {out}/.work/units/")
    assert lines[0].endswith(": [Errno 30] Read-only file system")
    assert list(out.rglob(TEMP_GLOB)) == [] and not (out / "README.md").exists()


def test_push_ignores_temporary_files(tmp_path: Path) -> None:
    from cpia_hf.hub import DATASET_IGNORE_PATTERNS, files_to_upload

    for name in ("data/full/M/r/r-00000.parquet", "data/full/M/r/r-00001.parquet.tmp4242", "README.md.tmp7",
                 ".work/units/r/roi-00000.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert files_to_upload(tmp_path, DATASET_IGNORE_PATTERNS) == ["data/full/M/r/r-00000.parquet"]


def test_second_run_on_a_locked_output_names_the_holder(sources: Path, tmp_path: Path, capsys) -> None:
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from cpia_hf.dataset.outlock import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert convert_cli(sources, out) == 2
    finally:
        holder.kill()  # a killed holder leaves no stale lock: the OS releases it
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cpia convert: error: cannot write {out}: locked by another cpia convert "
                          f"(pid {holder.pid} on {socket.gethostname()}, since ")
    assert not (out / "data").exists()
    leftover = out / "data" / "full" / "M" / "r" / "r-00000.parquet.tmp99999"  # left by a killed run
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    assert convert_cli(sources, out, "--subsets", "r") == 0
    assert not leftover.exists()


def test_damaged_shard_is_named_and_rebuilt(sources: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    before = tree_digest(out)
    flipped, truncated = sorted((out / "data" / "full").rglob("*.parquet"))[:2]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    mini = sorted((out / "data" / "mini").rglob("*.parquet"))[0]
    mini_data = bytearray(mini.read_bytes())
    mini_data[len(mini_data) // 2] ^= 0xFF
    mini.write_bytes(bytes(mini_data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    capsys.readouterr()
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    text = capsys.readouterr().out
    assert f"rebuilt damaged shard {flipped}: content differs from the recorded SHA-256" in text
    size = len(data)
    other = truncated.stat().st_size
    assert f"rebuilt damaged shard {truncated}: {other - 100} bytes, {other} recorded" in text
    assert f"rebuilt damaged shard {mini}: content differs from the recorded SHA-256" in text
    assert tree_digest(out) == before
    # bit rot that keeps the file's time is found by --verify-shards
    stat = flipped.stat()
    data = bytearray(flipped.read_bytes())
    data[size // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    os.utime(flipped, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    assert "rebuilt damaged" not in capsys.readouterr().out
    assert convert_cli(sources, out, "--subsets", "r,w", "--verify-shards") == 0
    assert f"rebuilt damaged shard {flipped}" in capsys.readouterr().out
    assert tree_digest(out) == before


def flip_image_byte(unit_file: Path) -> None:
    """Flip one byte inside a stored JPEG of a unit file: the file still reads, one image is silently wrong."""
    import pyarrow.parquet as pq

    image = pq.read_table(unit_file, columns=["image"]).column("image")[0].as_py()["bytes"]
    data = bytearray(unit_file.read_bytes())
    offset = data.find(image[len(image) // 2 : len(image) // 2 + 64])
    assert offset > 0
    data[offset] ^= 0xFF
    unit_file.write_bytes(bytes(data))


def test_damaged_unit_file_is_rebuilt_and_never_reaches_a_shard(sources: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    before = tree_digest(out)
    unit_file = out / ".work" / "units" / "w" / "a.parquet"
    original = unit_file.read_bytes()
    flip_image_byte(unit_file)
    for shard in (out / "data" / "full").rglob("w-*.parquet"):  # every shard of the subset is packed again
        shard.unlink()
    capsys.readouterr()
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"rebuilt damaged unit file {unit_file}: content differs from the recorded SHA-256" in lines
    assert "units: 4 (3 already done)" in lines
    assert unit_file.read_bytes() == original
    assert tree_digest(out) == before
    # a truncated unit file: found by its size, whatever its time
    stat = unit_file.stat()
    unit_file.write_bytes(original[:-500])
    os.utime(unit_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    expected = f"rebuilt damaged unit file {unit_file}: {len(original) - 500} bytes, {len(original)} recorded"
    assert expected in capsys.readouterr().out.splitlines()
    assert unit_file.read_bytes() == original and tree_digest(out) == before
    # a flipped byte under the recorded time is found by --verify-shards
    stat = unit_file.stat()
    flip_image_byte(unit_file)
    os.utime(unit_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert convert_cli(sources, out, "--subsets", "r,w", "--verify-shards") == 0
    assert f"rebuilt damaged unit file {unit_file}: content differs" in capsys.readouterr().out
    assert unit_file.read_bytes() == original
    # ... and, without it, by the packing that would read it: nothing of it is packed, the next run converts it
    flip_image_byte(unit_file)
    os.utime(unit_file, ns=(stat.st_atime_ns, unit_file.stat().st_mtime_ns - 10**9))
    os.utime(unit_file.with_suffix(".json"))
    record = json.loads(unit_file.with_suffix(".json").read_text())
    record["file"]["mtime_ns"] = unit_file.stat().st_mtime_ns  # damage under the recorded time (bit rot)
    unit_file.with_suffix(".json").write_text(json.dumps(record))
    for shard in (out / "data" / "full").rglob("w-*.parquet"):
        shard.unlink()
    capsys.readouterr()
    status = convert_cli(sources, out, "--subsets", "r,w")
    err = capsys.readouterr().err
    assert status == 1, err
    failed = [line for line in err.splitlines() if "not packed" in line]
    assert len(failed) == 1 and f"{unit_file}: content differs from the recorded SHA-256" in failed[0], err
    assert not list((out / "data" / "full").rglob("w-*.parquet"))  # no shard holds the damaged rows
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    assert unit_file.read_bytes() == original and tree_digest(out) == before


def test_a_unit_file_is_hashed_once_by_the_run_that_writes_it(sources: Path, tmp_path: Path, monkeypatch) -> None:
    from cpia_hf.dataset import stamps

    log = tmp_path / "hashed.txt"
    real = stamps.file_sha256

    def logged(path: Path) -> str:  # the workers are forks of this process: they log too
        with log.open("a") as stream:
            stream.write(f"{path}\n")
        return real(path)

    monkeypatch.setattr(stamps, "file_sha256", logged)
    out = tmp_path / "out"
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    hashed = log.read_text().splitlines()
    unit_files = sorted(str(p) for p in (out / ".work" / "units").rglob("*.parquet"))
    assert len(unit_files) == 4 and sorted(h for h in hashed if h in unit_files) == unit_files  # as written, once
    # a rerun that packs again reuses the unit files: packing checks each one before its rows go into a shard
    for shard in (out / "data" / "full").rglob("*.parquet"):
        shard.unlink()
    log.unlink()
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    assert set(unit_files) <= set(log.read_text().splitlines())


def test_copied_output_reruns_rewriting_nothing(sources: Path, tmp_path: Path, capsys) -> None:
    import subprocess

    out = tmp_path / "out"
    assert convert_cli(sources, out, "--subsets", "r,w") == 0
    copy = tmp_path / "elsewhere" / "out"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)  # new times, another path
    files = sorted(p for p in copy.rglob("*.parquet"))
    assert any(".work" in p.parts for p in files) and any("data" in p.parts for p in files)
    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    capsys.readouterr()
    assert convert_cli(sources, copy, "--subsets", "r,w") == 0
    text = capsys.readouterr().out
    assert "units: 4 (4 already done)" in text and "rebuilt" not in text
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(copy.rglob("*.parquet"))} == written
    assert tree_digest(copy) == tree_digest(out)


def test_what_gives_no_row_is_named(tmp_path: Path, capsys) -> None:
    import numpy as np

    root = tmp_path / "sources"
    (root / "wsi" / "folder.svs").mkdir(parents=True)
    write_slide(root / "wsi" / "good.svs", he_like_image(1024, 1024, seed=1, tissue=0.9), 0.5)
    write_slide(root / "wsi" / "tiny.svs", he_like_image(300, 300, seed=2, tissue=0.9), 0.5)
    write_slide(root / "wsi" / "blank.svs", np.full((1024, 1024, 3), 243, np.uint8), 0.5)
    (root / "wsi" / "gone.svs").symlink_to(root / "wsi" / "deleted.svs")
    (root / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "w", "kind": "wsi", "path": "wsi", "pattern": "*.svs", **COMMON}]}))
    out = tmp_path / "out"
    assert convert_cli(root, out) == 0
    text = capsys.readouterr().out
    assert "skipped: [w] wsi/folder.svs: a folder, not a slide or image file" in text
    assert f"skipped: [w] wsi/gone.svs: dangling symbolic link (to {root / 'wsi' / 'deleted.svs'})" in text
    assert "skipped: [w] wsi/tiny.svs: no tile kept: too small, 303x303 px at 0.4942 um/px" in text
    rule = units.ConvertOptions().tissue_rule
    assert f"skipped: [w] wsi/blank.svs: no tile kept: no tissue found by the '{rule}' tissue rule" in text
    assert source_files(out) == {"wsi/good.svs"}
    assert "coverage of the release (built / released):\n| subset | kind | XL | L | M | S |" in text
    assert "\n| w | wsi | – | " in text
    assert convert_cli(root, out) == 0  # a rerun says it again (from the unit records)
    assert "wsi/blank.svs: no tile kept" in capsys.readouterr().out


def test_empty_build_is_an_error_without_card(tmp_path: Path, capsys) -> None:
    root = tmp_path / "sources"
    root.mkdir()
    names = [f"s{k}" for k in range(7)]
    (root / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": n, "kind": "wsi", "path": n, "pattern": "*.svs", **COMMON} for n in names]}))
    out = tmp_path / "out"
    assert convert_cli(root, out) == 1
    captured = capsys.readouterr()
    skipped = [line for line in captured.out.splitlines() if line.startswith("skipped:")]
    assert skipped == [f"skipped: 7 source folders not found, e.g. {root / 's0'}: source folder of 's0' not found "
                       f"(all listed in {out / '.work' / 'missing-sources.txt'}; -v prints them)"]
    assert (out / ".work" / "missing-sources.txt").read_text().splitlines() == [
        f"{root / n}: source folder of '{n}' not found" for n in names]
    assert "error: no rows were built" in captured.err
    assert not (out / "README.md").exists() and not (out / "data").exists()


def test_full_disk_stops_before_converting(sources: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real_statvfs = os.statvfs
    calls = tmp_path / "calls"
    calls.mkdir()
    real_rows = units._wsi_items

    def counted(unit, *args):
        (calls / unit.unit_id).touch()
        return real_rows(unit, *args)

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(units, "_wsi_items", counted)
    monkeypatch.setattr(os, "statvfs", lambda path: Full() if str(path).startswith(str(tmp_path)) else real_statvfs(path))
    out = tmp_path / "out"
    assert convert_cli(sources, out) == 2
    assert capsys.readouterr().err.strip().endswith(": [Errno 28] No space left on device")
    assert list(calls.iterdir()) == []  # no slide was read for nothing
