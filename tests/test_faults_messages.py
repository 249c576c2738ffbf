"""One line per failure, never a traceback: each fault below is made for real and its output counted line by line."""
from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cpia_hf.dataset import units
from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.convert import ConvertReport, print_report
from cpia_hf.dataset.units import ConvertOptions, discover_units, error_text, printable

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).with_name("cluster_preload.py")
COMMON = {"organ": "breast", "disease": "unknown", "stain": "H&E", "field": "histopathology", "license": "unknown",
          "homepage": "unknown", "citation": "unknown"}


def command_line(process) -> str:
    """A process's command line, or "" for one that is gone or a zombie (an orphan the session reaps)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def roi_sources(root: Path, names: list[str]) -> Path:
    """An ROI source folder `roi` with one noisy PNG per name, and its catalog."""
    (root / "roi").mkdir(parents=True)
    for k, name in enumerate(names):
        pixels = np.random.default_rng(k).integers(0, 255, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "roi" / name)
    (root / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", **COMMON}]}))
    return root


def convert_command(sources: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(sources / "catalog.yaml"),
            "--source-root", str(sources), "--out", str(out), "--no-progress", *extra]


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".work" not in p.parts}


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path]:
    sources = roi_sources(tmp_path / "sources", [f"r{k}.png" for k in range(6)])
    out = tmp_path / "out"
    subprocess.run(convert_command(sources, out), check=True, capture_output=True)
    return sources, out


def test_damaged_shard_footer_under_unchanged_size_and_time_is_named_and_rebuilt(built) -> None:
    sources, out = built
    before = tree_digest(out)
    shard = out / "data" / "full" / "M" / "r" / "r-00000.parquet"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-40:-8] = bytes(b ^ 0xFF for b in data[-40:-8])  # the footer, same length
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = subprocess.run(convert_command(sources, out), capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    assert [line for line in result.stdout.splitlines() if "damaged shard" in line] == [
        f"rebuilt damaged shard {shard}: content differs from the recorded SHA-256"]
    assert tree_digest(out) == before


def test_unreadable_cached_unit_file_is_one_line(built) -> None:
    """Root reads any file whatever its permissions: a folder in the unit file's place makes it unreadable. A
    unit file that fails its check is converted again; here its place cannot be written either, so the run
    stops in one line naming it (exit 2, as for any output that cannot be written)."""
    sources, out = built
    unit_file = out / ".work" / "units" / "r" / "roi-00000.parquet"
    unit_file.unlink()
    unit_file.mkdir()
    shutil.rmtree(out / "data")
    result = subprocess.run(convert_command(sources, out), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"cpia convert: error: cannot write {unit_file}: [Errno 21] Is a directory"]


def test_a_write_failing_in_the_middle_of_a_shard_is_one_line(built) -> None:
    """The file-size limit (`ulimit -f`) set below the shard's size: its write fails after the first pages."""
    sources, out = built
    shard = out / "data" / "full" / "M" / "r" / "r-00000.parquet"
    limit = shard.stat().st_size // 2
    shutil.rmtree(out / "data")
    shutil.rmtree(out / ".work" / "pack")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(convert_command(sources, out), capture_output=True, text=True, preexec_fn=small_files)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"cpia convert: error: cannot write {shard}: [Errno 27] File too large"]
    assert not shard.exists() and not list(out.rglob("*.tmp[0-9]*"))


def test_unreachable_scheduler_is_one_line_within_the_short_timeout(tmp_path: Path) -> None:
    sources = roi_sources(tmp_path / "sources", ["a.png"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    start = time.monotonic()
    result = subprocess.run(convert_command(sources, tmp_path / "out", "--scheduler", "tcp://127.0.0.1:1"),
                            capture_output=True, text=True, env=env)
    assert time.monotonic() - start < 25  # Dask's default connect timeout is 30 s
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:1")


def test_scheduler_dying_mid_run_is_one_line(tmp_path: Path) -> None:
    import psutil
    from distributed import Client

    from loopback import loopback_cluster  # the tests' launcher (tests/ is on the path)

    sources = roi_sources(tmp_path / "sources", ["a.png", "b.png"])
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "CPIA_TEST_UNIT_DELAY": "5"}
    with loopback_cluster(1, env=env, worker_args=("--preload", str(PRELOAD)), timeout=90) as address:
        scheduler = next(p for p in psutil.Process().children() if "dask scheduler" in command_line(p))
        run = subprocess.Popen(convert_command(sources, tmp_path / "out", "--scheduler", address),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Client(address, timeout=30, set_as_default=False) as watcher:  # until the run's tasks are submitted
            while not watcher.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
                assert run.poll() is None, run.communicate()
                time.sleep(0.2)
        os.killpg(scheduler.pid, signal.SIGKILL)
        try:
            _, stderr = run.communicate(timeout=60)
        finally:
            run.kill()
    assert run.returncode == 2
    assert stderr.splitlines() == [f"error: lost the connection to the Dask scheduler at {address} (scheduler "
                                   "stopped or unreachable); rerun the same command to resume"]


def test_memory_error_is_said_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = roi_sources(tmp_path / "sources", ["a.png"])
    entry = load_catalog(sources / "catalog.yaml")[0]
    unit = discover_units(entry, sources)[0]

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(units, "convert_roi", out_of_memory)
    result = units.convert_unit(unit, sources, tmp_path / "work", ConvertOptions())
    assert result.rows == 0
    assert [(f.file, f.reason) for f in result.failures] == [
        ("roi/a.png", "out of memory while converting it: give each worker more memory")]
    assert error_text(KeyError()) == "KeyError" and error_text(ValueError("two\nlines")) == "ValueError: two lines"


def test_a_config_without_rows_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    print_report(ConvertReport(rows={"full": {}, "mini": {"M": 3}}), tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["full: no rows", "mini: M 3 rows"]


def test_file_names_with_newlines_and_escape_codes_are_escaped(tmp_path: Path) -> None:
    hostile = "two\nlines\x1b[31mred.png"
    sources = roi_sources(tmp_path / "sources", ["ok.png"])
    (sources / "roi" / hostile).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a broken PNG
    result = subprocess.run(convert_command(sources, tmp_path / "out", "--configs", "full"), capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert "\x1b" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("  [r] roi/two\\nlines\\x1b[31mred.png: unreadable image")
    failure_list = tmp_path / "out" / ".work" / "failures.csv"
    assert str(failure_list) in lines[0]
    records = failure_list.read_text().splitlines()  # one line a record, also for a name with a newline
    assert len(records) == 2 and records[0] == "kind,subset,file,reason"
    kind, subset, file, reason = next(csv.reader(records[1:]))
    assert (kind, subset, file) == ("file", "r", "roi/two\\nlines\\x1b[31mred.png") and reason.startswith("unreadable image")
    (sources / "roi" / hostile).unlink()  # fixed: the next run leaves no failure list behind
    assert subprocess.run(convert_command(sources, tmp_path / "out", "--configs", "full")).returncode == 0
    assert not failure_list.exists()
    assert printable("a\u2028b\x85c\udcff") == "a\\u2028b\\x85c\\xff"
