"""The fault suite: hostile inputs and faults made for real against `cpia convert`, one table of what happened.

    python benchmarks/faults.py [--heavy] [--cases NAME,...] [--out DIR] [--seed 0]

Builds small sources (six ROI PNGs and one 2048x1536 SVS slide) in a temporary folder, then, for each
case, a copy of them and a fresh output folder, makes the fault and runs `cpia convert` as a user would
(a subprocess, `--workers 2`). Prints one table: case, expected, observed, pass/fail, the peak RSS of the
run's worker processes (sampled every 50 ms) and the processes of the run still alive afterwards (5 s
after a kill). Exit status 1 when any case fails. See docs/faults.md.

`--heavy` adds the slow cases: 16 instead of 3 `kill -9` at random points, a 30000x30000 PNG converted
end to end, and the Dask cases on a loopback cluster (a killed worker, a killed client, a scheduler
killed mid-run). The full disk is a file-size limit (`ulimit -f`), which needs no root; the read-only
output is a read-only tmpfs when run as root (root writes through permissions), else a 0555 folder.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback cluster launcher of the tests

from cpia_hf.demo.synth import corrupt_tile, he_like_image, write_slide  # noqa: E402

COMMON = {"organ": "breast", "disease": "unknown", "stain": "H&E", "field": "histopathology", "license": "unknown",
          "homepage": "unknown", "citation": "unknown"}
RESUME = "rerun the same command to resume"
AFTER_KILL_S = 5.0
# A `cpia convert` whose worker dies on any slide named "poison" (as a decoder crash or the OOM killer would).
POISONED = ("import os, signal, sys\nfrom cpia_hf.dataset import units\n_rows = units._wsi_items\n"
            "def rows(unit, *args):\n    if 'poison' in unit.files[0]:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return _rows(unit, *args)\nunits._wsi_items = rows\nfrom cpia_hf.cli import main\nsys.exit(main())\n")


@dataclass
class Run:
    """A finished `cpia convert`: status, output, the peak RSS of its workers and its descendants' handles."""

    returncode: int
    stdout: str
    stderr: str
    peak_worker_mb: float
    descendants: list = field(default_factory=list)

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.splitlines()


@dataclass
class Outcome:
    case: str
    expected: str
    observed: str
    ok: bool
    peak_worker_mb: float = 0.0
    left_alive: int = 0


class Sampler:
    """Samples the RSS of a process's descendants every 50 ms; remembers every descendant it saw."""

    def __init__(self, pid: int, only: str | None = None):
        self.pid, self.only, self.peak, self.seen, self._stop = pid, only, 0, {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for child in psutil.Process(self.pid).children(recursive=True):
                    if self.only and self.only not in command_line(child):
                        continue
                    self.seen.setdefault(child.pid, child)
                    self.peak = max(self.peak, child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> tuple[float, list]:
        self._stop.set()
        self.thread.join()
        return self.peak / 2**20, list(self.seen.values())


def command_line(process) -> str:
    """A process's command line, or "" for one that is gone or a zombie (an orphan the session reaps)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def convert_args(sources: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--catalog", str(sources / "catalog.yaml"), "--source-root", str(sources), "--out", str(out),
            "--workers", "2", "--no-progress", *extra]


def start(args: list[str], *, code: str | None = None, **popen) -> tuple[subprocess.Popen, Sampler]:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "cpia_hf.cli", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)
    return process, Sampler(process.pid)


def run(args: list[str], **kwargs) -> Run:
    process, sampler = start(args, **kwargs)
    stdout, stderr = process.communicate(timeout=600)
    peak, seen = sampler.stop()
    return Run(process.returncode, stdout, stderr, peak, seen)


def alive(processes: list, grace_s: float = 0.0) -> int:
    time.sleep(grace_s)
    count = 0
    for process in processes:
        try:
            count += process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            pass
    return count


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".work" not in path.parts:
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def one_line(result: Run, expected_status: int, must_contain: str) -> tuple[bool, str]:
    lines = [line for line in result.err_lines if not line.startswith("FAILED: ")]
    ok = result.returncode == expected_status and len(lines) == 1 and must_contain in lines[0]
    shown = lines[0] if len(lines) == 1 else f"{len(lines)} lines"
    return ok, f"exit {result.returncode}; {shown[:110]}"


# --- sources -----------------------------------------------------------------------------------------------


def write_catalog(root: Path, slides: bool = True) -> None:
    entries = [{"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", **COMMON}]
    if slides:
        entries.insert(0, {"name": "w", "kind": "wsi", "path": "wsi", "pattern": "*.*", **COMMON})
    (root / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": entries}))


def base_sources(root: Path) -> Path:
    (root / "roi").mkdir(parents=True)
    (root / "wsi").mkdir()
    for k in range(6):
        pixels = np.random.default_rng(k).integers(0, 255, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "roi" / f"r{k}.png")
    write_slide(root / "wsi" / "good.svs", he_like_image(2048, 1536, seed=7, tissue=0.9), 0.5)
    write_catalog(root)
    return root


def png_claiming(path: Path, width: int, height: int, rows: bool = False) -> Path:
    """A PNG header of width x height greyscale pixels: with `rows`, a genuine all-black image written row by
    row (large dimensions, a small file); without, a tiny body (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rows:
        compressor = zlib.compressobj(9)
        row = b"\0" * (width + 1)
        body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        body = zlib.compress(b"\0" * 10)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


class Bench:
    def __init__(self, work: Path, seed: int, heavy: bool):
        self.work, self.seed, self.heavy = work, seed, heavy
        self.sources = base_sources(work / "sources")
        self.clean = work / "clean"
        self.clean_run = run(convert_args(self.sources, self.clean))
        self.clean_digest = tree_digest(self.clean)
        self.count = 0

    def case_dir(self) -> tuple[Path, Path]:
        """A fresh copy of the sources and an output path for one case."""
        self.count += 1
        folder = self.work / f"case{self.count:02d}"
        shutil.copytree(self.sources, folder / "sources")
        return folder / "sources", folder / "out"

    # --- the cases -----------------------------------------------------------------------------------------

    def kill9_rerun(self) -> Outcome:
        rng = random.Random(self.seed)
        kills = 16 if self.heavy else 3
        wall = max(1.0, self._clean_wall)
        identical = left = 0
        peak = 0.0
        for _ in range(kills):
            sources, out = self.case_dir()
            process, sampler = start(convert_args(sources, out))
            time.sleep(rng.uniform(0.5, wall))
            process.kill()
            process.communicate()
            worker_mb, seen = sampler.stop()
            peak = max(peak, worker_mb)
            left += alive(seen, AFTER_KILL_S if kills <= 3 else 1.0)
            rerun = run(convert_args(sources, out))
            identical += rerun.returncode == 0 and tree_digest(out) == self.clean_digest
        return Outcome("kill -9 at random points, rerun", f"{kills}/{kills} reruns identical, 0 left",
                       f"{identical}/{kills} identical, {left} left", identical == kills and left == 0, peak, left)

    def _signal(self, signum: int) -> Outcome:
        sources, out = self.case_dir()
        process, sampler = start(convert_args(sources, out), start_new_session=True)
        units = out / ".work" / "units"
        while not list(units.rglob("*.json")) and process.poll() is None:
            time.sleep(0.05)
        (os.killpg if signum == signal.SIGINT else os.kill)(process.pid, signum)
        _, stderr = process.communicate()
        peak, seen = sampler.stop()
        left = alive(seen, AFTER_KILL_S)
        name = "Ctrl-C (SIGINT to the process group)" if signum == signal.SIGINT else signal.Signals(signum).name
        wanted = f"interrupted; {RESUME}" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        lines = stderr.splitlines()
        ok = process.returncode == 128 + signum and len(lines) == 1 and wanted in lines[0] and left == 0
        observed = f"exit {process.returncode}; {lines[0] if len(lines) == 1 else f'{len(lines)} lines'}"
        return Outcome(name, f"exit {128 + signum}, one line, 0 left", observed[:120], ok, peak, left)

    def sigterm(self) -> Outcome:
        return self._signal(signal.SIGTERM)

    def sighup(self) -> Outcome:
        return self._signal(signal.SIGHUP)

    def ctrl_c(self) -> Outcome:
        return self._signal(signal.SIGINT)

    def concurrent_run(self) -> Outcome:
        sources, out = self.case_dir()
        first, sampler = start(convert_args(sources, out))
        while not (out / ".work" / "convert.lock.owner").exists() and first.poll() is None:
            time.sleep(0.05)
        second = run(convert_args(sources, out))
        first.communicate()
        peak, seen = sampler.stop()
        ok, observed = one_line(second, 2, "locked by another cpia convert")
        ok &= first.returncode == 0 and tree_digest(out) == self.clean_digest
        return Outcome("concurrent second run", "second refused in one line, first completes", observed, ok, peak,
                       alive(seen))

    def full_disk(self) -> Outcome:
        sources, out = self.case_dir()
        limit = max(p.stat().st_size for p in (self.clean / "data").rglob("*.parquet")) // 2

        def small_files() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        result = run(convert_args(sources, out), preexec_fn=small_files)
        ok, observed = one_line(result, 2, "cannot write")
        ok &= not list(out.rglob("*.tmp[0-9]*"))
        return Outcome("disk full mid-file (ulimit -f)", "exit 2, one line naming the file, no temp file", observed,
                       ok, result.peak_worker_mb, alive(result.descendants))

    def read_only_output(self) -> Outcome:
        sources, out = self.case_dir()
        out.mkdir(parents=True)
        mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
                                                       capture_output=True).returncode == 0
        if not mounted:
            out.chmod(0o555)
        try:
            result = run(convert_args(sources, out))
        finally:
            if mounted:
                subprocess.run(["umount", str(out)], check=False)
            else:
                out.chmod(0o755)
        ok, observed = one_line(result, 2, "Read-only file system" if mounted else "Permission denied")
        return Outcome(f"read-only output ({'ro tmpfs' if mounted else 'chmod 555'})", "exit 2, one line", observed,
                       ok, result.peak_worker_mb, alive(result.descendants))

    def built_case(self) -> tuple[Path, Path]:
        """A case folder with its output already built in place (a copied output is rebuilt, not reused)."""
        sources, out = self.case_dir()
        run(convert_args(sources, out))
        return sources, out

    def damaged_shard(self) -> Outcome:
        sources, out = self.built_case()
        shard = sorted((out / "data" / "full").rglob("*.parquet"))[0]
        stat = shard.stat()
        data = bytearray(shard.read_bytes())
        data[-40:-8] = bytes(b ^ 0xFF for b in data[-40:-8])
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        result = run(convert_args(sources, out))
        named = [line for line in result.stdout.splitlines() if line.startswith("rebuilt damaged shard")]
        ok = result.returncode == 0 and not result.stderr and len(named) == 1 and tree_digest(out) == self.clean_digest
        return Outcome("damaged shard footer, same size and time", "named once, rebuilt identical",
                       f"exit {result.returncode}; {len(named)} named; identical {tree_digest(out) == self.clean_digest}",
                       ok, result.peak_worker_mb, alive(result.descendants))

    def unreadable_unit(self) -> Outcome:
        sources, out = self.built_case()
        unit_file = sorted((out / ".work" / "units").rglob("*.parquet"))[0]
        unit_file.unlink()
        unit_file.mkdir()  # root reads any file: a folder in its place is unreadable for everyone
        shutil.rmtree(out / "data")
        result = run(convert_args(sources, out))
        ok, observed = one_line(result, 2, f"cannot write {unit_file}")  # checked, rebuilt: its place is no file
        return Outcome("unreadable cached unit file", "exit 2, one line naming it", observed, ok,
                       result.peak_worker_mb, alive(result.descendants))

    def poison_slide(self) -> Outcome:
        sources, out = self.case_dir()
        shutil.copy(sources / "wsi" / "good.svs", sources / "wsi" / "poison.svs")
        result = run(convert_args(sources, out), code=POISONED)
        ok, observed = one_line(result, 1, "poison.svs: worker killed, signal 9")
        return Outcome("poison slide (kills its worker)", "exit 1, one line, the rest converts", observed, ok,
                       result.peak_worker_mb, alive(result.descendants))

    def decompression_bomb(self) -> Outcome:
        sources, out = self.case_dir()
        png_claiming(sources / "roi" / "bomb.png", 32768, 32769)
        result = run(convert_args(sources, out))
        ok, observed = one_line(result, 1, "bomb.png: decompression bomb")
        return Outcome("decompression bomb (header 32768x32769)", "exit 1, one line", observed, ok,
                       result.peak_worker_mb, alive(result.descendants))

    def memory_bound(self) -> Outcome:
        sources, out = self.case_dir()
        side = 30000 if self.heavy else 20000
        png_claiming(sources / "roi" / "large.png", side, side, rows=True)
        result = run(convert_args(sources, out))
        ok, observed = one_line(result, 1, "--roi-memory-gb")
        ok &= result.peak_worker_mb < 1024
        return Outcome(f"small PNG of {side}x{side} px (memory bound)", "exit 1, one line, worker < 1 GB", observed,
                       ok, result.peak_worker_mb, alive(result.descendants))

    def truncated_jpeg_tiles(self) -> Outcome:
        sources, out = self.case_dir()
        slide = sources / "wsi" / "good.svs"
        corrupt_tile(slide, 1, 1)
        corrupt_tile(slide, 3, 2, seed=1)
        result = run(convert_args(sources, out))
        lines = [line for line in result.err_lines if "good.svs" in line]
        ok = result.returncode == 1 and "Traceback" not in result.stderr and len(lines) == 1 and all(
            "unreadable" in line or "corrupt" in line or "dropped" in line for line in lines)
        return Outcome("corrupt JPEG tiles in a slide", "exit 1, one line, no traceback, the rest converts",
                       f"exit {result.returncode}; {len(lines)} line(s): {(lines or [''])[0][:80]}", bool(ok),
                       result.peak_worker_mb, alive(result.descendants))

    def lying_mpp(self) -> Outcome:
        sources, out = self.case_dir()
        write_slide(sources / "wsi" / "liar.svs", he_like_image(1024, 1024, seed=3), 20.0)
        result = run(convert_args(sources, out))
        ok, observed = one_line(result, 1, "liar.svs")
        return Outcome("slide claiming 20 um/px", "exit 1, one line naming it", observed, ok,
                       result.peak_worker_mb, alive(result.descendants))

    def output_in_sources(self) -> Outcome:
        sources, out = self.case_dir()
        catalog = yaml.safe_load((sources / "catalog.yaml").read_text())
        catalog["entries"][1]["pattern"] = "**/*.png"  # would match the output's organ chart
        (sources / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        inside = sources / "roi" / "built"
        first = run(convert_args(sources, inside))
        second = run(convert_args(sources, inside))
        notes = [line for line in second.stdout.splitlines() if "cpia output folder inside the sources" in line]
        ok = first.returncode == 0 and second.returncode == 0 and len(notes) == 1
        ok &= tree_digest(inside) == self.clean_digest
        return Outcome("--out inside a source folder, rerun", "own files not read, said once",
                       f"exit {second.returncode}; {len(notes)} note(s)", ok, second.peak_worker_mb,
                       alive(second.descendants))

    def hostile_name(self) -> Outcome:
        sources, out = self.case_dir()
        (sources / "roi" / "two\nlines\x1b[31m.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        result = run(convert_args(sources, out))
        ok, observed = one_line(result, 1, "two\\nlines\\x1b[31m.png")
        ok &= "\x1b" not in result.stderr
        return Outcome("file name with newline and escape code", "exit 1, one escaped line", observed, ok,
                       result.peak_worker_mb, alive(result.descendants))

    # --- Dask (heavy) ------------------------------------------------------------------------------------------

    def dask_cases(self) -> list[Outcome]:
        from loopback import loopback_cluster

        preload = self.work / "preload.py"
        preload.write_text((ROOT / "tests" / "cluster_preload.py").read_text())
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1", "CPIA_TEST_UNIT_DELAY": "1"}
        outcomes = []
        cluster_workers = Sampler(os.getpid(), only="dask worker")  # the cluster's workers, not the client's
        with loopback_cluster(2, env=env, worker_args=("--preload", str(preload)), timeout=120) as address:
            sources, out = self.case_dir()
            shutil.copy(sources / "wsi" / "good.svs", sources / "wsi" / "poison.svs")
            result = run(convert_args(sources, out, "--scheduler", address))
            ok, observed = one_line(result, 1, "poison.svs: worker killed")
            outcomes.append(Outcome("Dask worker killed by a slide", "exit 1, one line", observed, ok,
                                    result.peak_worker_mb, alive(result.descendants)))
            sources, out = self.case_dir()
            process, sampler = start(convert_args(sources, out, "--scheduler", address))
            while not list((out / ".work" / "units").rglob("*.json")) and process.poll() is None:
                time.sleep(0.05)
            killed_at = time.time()
            process.kill()
            process.communicate()
            peak, seen = sampler.stop()
            time.sleep(AFTER_KILL_S)
            late = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime > killed_at + 0.5
                    and "convert.lock" not in p.name]
            rerun = run(convert_args(sources, out, "--scheduler", address))
            ok = not late and rerun.returncode == 0 and tree_digest(out) == self.clean_digest
            outcomes.append(Outcome("Dask client killed -9, rerun", "nothing written after, rerun identical",
                                    f"{len(late)} written after; rerun identical {ok}", ok, peak, alive(seen)))
        sources, out = self.case_dir()
        with loopback_cluster(1, env={**env, "CPIA_TEST_UNIT_DELAY": "5"}, worker_args=("--preload", str(preload)),
                              timeout=120) as address:
            scheduler = next(p for p in psutil.Process().children() if "dask scheduler" in command_line(p))
            process, sampler = start(convert_args(sources, out, "--scheduler", address))
            while not (out / ".work" / "units").exists() and process.poll() is None:
                time.sleep(0.05)
            time.sleep(3)
            os.killpg(scheduler.pid, signal.SIGKILL)
            stdout, stderr = process.communicate(timeout=120)
            peak, seen = sampler.stop()
        result = Run(process.returncode, stdout, stderr, peak, seen)
        worker_mb, _ = cluster_workers.stop()
        for outcome in outcomes:
            outcome.peak_worker_mb = worker_mb
        result.peak_worker_mb = worker_mb
        ok, observed = one_line(result, 2, address)
        outcomes.append(Outcome("Dask scheduler killed mid-run", "exit 2, one line naming it", observed, ok,
                                worker_mb, alive(seen)))
        return outcomes

    @property
    def _clean_wall(self) -> float:
        return getattr(self, "_wall", 8.0)


CASES: dict[str, Callable[[Bench], Outcome]] = {
    "kill9": Bench.kill9_rerun, "sigterm": Bench.sigterm, "sighup": Bench.sighup, "ctrl-c": Bench.ctrl_c,
    "concurrent": Bench.concurrent_run, "full-disk": Bench.full_disk, "read-only": Bench.read_only_output,
    "damaged-shard": Bench.damaged_shard, "unreadable-unit": Bench.unreadable_unit, "poison": Bench.poison_slide,
    "bomb": Bench.decompression_bomb, "memory": Bench.memory_bound, "corrupt-tiles": Bench.truncated_jpeg_tiles,
    "lying-mpp": Bench.lying_mpp, "out-in-sources": Bench.output_in_sources, "hostile-name": Bench.hostile_name,
}


def print_table(outcomes: list[Outcome]) -> None:
    head = ["case", "expected", "observed", "result", "peak RSS/worker", "left alive"]
    rows = [[o.case, o.expected, o.observed, "pass" if o.ok else "FAIL", f"{o.peak_worker_mb:.0f} MB",
             str(o.left_alive)] for o in outcomes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy", action="store_true", help="16 kills, a 30000^2 PNG, the Dask cases")
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}, dask")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = parser.parse_args()
    chosen = args.cases.split(",") if args.cases else [*CASES, *(["dask"] if args.heavy else [])]
    unknown = sorted(set(chosen) - {*CASES, "dask"})
    if unknown:
        parser.error(f"--cases: unknown case(s) {', '.join(unknown)}")
    work = args.out or Path(tempfile.mkdtemp(prefix="cpia-faults-"))
    try:
        start_time = time.monotonic()
        bench = Bench(work, args.seed, args.heavy)
        bench._wall = time.monotonic() - start_time
        if bench.clean_run.returncode != 0:
            print(f"the clean run failed:\n{bench.clean_run.stderr}", file=sys.stderr)
            return 1
        outcomes = []
        for name in chosen:
            if name == "dask":
                outcomes.extend(bench.dask_cases())
            else:
                outcomes.append(CASES[name](bench))
            print(f"{outcomes[-1].case}: {'pass' if outcomes[-1].ok else 'FAIL'}", file=sys.stderr, flush=True)
        print(f"\nfault suite: {sum(o.ok for o in outcomes)}/{len(outcomes)} cases pass "
              f"({time.monotonic() - start_time:.0f} s; clean run {bench._wall:.1f} s)\n")
        print_table(outcomes)
        return 0 if all(o.ok for o in outcomes) else 1
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
