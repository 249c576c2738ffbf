"""Benchmark conversion locally and on a Dask cluster on loopback: scaling and scheduler overhead.

    python benchmarks/convert_cluster.py [--slides 8 --width 12288 --height 12288 --mpp 0.25 --out DIR]

Generates a source tree of `--slides` H&E-like SVS slides once (cached in --out), then converts it
(units and packing, no card) four ways, each into a fresh folder: locally with 1 and 2 processes
(`--workers`), and through a loopback Dask cluster (`dask scheduler` + `dask worker --nthreads 1`
processes on 127.0.0.1) with 1 and 2 workers. Prints wall time, units/s, the scaling efficiency of
2 vs 1 (speed-up / 2) and the scheduler overhead per unit: (cluster wall - local wall) / units at
the same parallelism, and separately the client's start-up and the scheduler's round trip per task
(trivial tasks submitted the same way). Each figure is the best of `--repeat` runs (other processes on the machine
slow some runs); the Dask workers import the converter before the first run, as the benchmark
process itself has. Also checks that all outputs are byte-identical, and prints the workers' peak RSS.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback cluster launcher of the tests

from cpia_hf.dataset.catalog import load_catalog  # noqa: E402
from cpia_hf.dataset.convert import convert  # noqa: E402
from cpia_hf.demo.synth import he_like_image, write_slide  # noqa: E402
from loopback import loopback_cluster  # noqa: E402


def generate(folder: Path, slides: int, width: int, height: int, mpp: float) -> Path:
    """The source tree (one WSI subset) and its catalog; reused when present."""
    catalog = folder / "catalog.yaml"
    if catalog.exists():
        return catalog
    (folder / "wsi").mkdir(parents=True, exist_ok=True)
    for k in range(slides):
        write_slide(folder / "wsi" / f"BENCH-{k:04d}.svs", he_like_image(width, height, seed=k, tissue=0.6), mpp,
                    vendor="aperio", tile=256, quality=90)
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [{
        "name": "bench-wsi", "kind": "wsi", "path": "wsi", "pattern": "*.svs", "organ": "breast",
        "disease": "unknown", "stain": "H&E", "field": "histopathology", "license": "unknown",
        "homepage": "unknown", "citation": "unknown"}]}))
    return catalog


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted((folder / "data").rglob("*.parquet")):
        sha.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return sha.hexdigest()


def timed(sources: Path, out: Path, **kwargs) -> tuple[float, int, str]:
    entries = load_catalog(sources / "catalog.yaml")
    start = time.perf_counter()
    report = convert(entries, sources, out, configs=("full",), card=False, progress=False, **kwargs)
    wall = time.perf_counter() - start
    assert report.ok, report.failures
    return wall, report.units, digest(out)


def _warm() -> None:
    import cpia_hf.dataset.convert  # noqa: F401
    import cpia_hf.dataset.slide.tiles  # noqa: F401


def warm_up(address: str) -> None:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        client.run(_warm)


def best(sources: Path, out: Path, repeat: int, **kwargs) -> tuple[float, int, str]:
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(timed(sources, out, **kwargs))
    assert len({d for _, _, d in runs}) == 1
    return min(runs)


def _noop(k: int) -> int:
    return k


def task_overhead_ms(address: str, tasks: int = 400) -> tuple[float, float]:
    """Client start-up (connect + version check, ms) and the scheduler's round trip per task (ms) of
    `tasks` trivial tasks submitted as the converter submits units."""
    from cpia_hf.dataset.cluster import DaskExecutor

    start = time.perf_counter()
    with DaskExecutor(address) as executor:
        connect = time.perf_counter() - start
        start = time.perf_counter()
        executor.map(_noop, [(k,) for k in range(tasks)], "noop", False)
        per_task = (time.perf_counter() - start) / tasks
    return connect * 1000, per_task * 1000


def worker_peak_rss_mb(address: str) -> dict[str, float]:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(sorted(peaks.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--width", type=int, default=12288)
    parser.add_argument("--height", type=int, default=12288)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cpia-hf-cluster-benchmark")
    args = parser.parse_args()

    sources = args.out / f"sources-{args.slides}x{args.width}x{args.height}-mpp{args.mpp}"
    start = time.perf_counter()
    generate(sources, args.slides, args.width, args.height, args.mpp)
    print(f"sources: {args.slides} slides {args.width}x{args.height} at {args.mpp} um/px in {sources} "
          f"({time.perf_counter() - start:.1f} s to prepare)")
    results: dict[tuple[str, int], tuple[float, int, str]] = {}
    peaks: dict[int, dict[str, float]] = {}
    overheads: dict[int, tuple[float, float]] = {}
    for n in (1, 2):
        results["local", n] = best(sources, args.out / f"local-{n}", args.repeat, workers=n)
        env = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",  # workers import this checkout
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with loopback_cluster(n, env=env) as address:
            warm_up(address)
            results["dask", n] = best(sources, args.out / f"dask-{n}", args.repeat, scheduler=address)
            peaks[n] = worker_peak_rss_mb(address)
            overheads[n] = task_overhead_ms(address)
    units = results["local", 1][1]
    print(f"\n{'run':<22}{'wall s':>9}{'units/s':>10}")
    for (kind, n), (wall, _, _) in results.items():
        label = f"local --workers {n}" if kind == "local" else f"dask, {n} worker(s)"
        print(f"{label:<22}{wall:>9.2f}{units / wall:>10.2f}")
    for kind in ("local", "dask"):
        efficiency = results[kind, 1][0] / results[kind, 2][0] / 2
        print(f"scaling efficiency {kind} (2 vs 1): {efficiency:.2f}")
    for n in (1, 2):
        overhead = (results["dask", n][0] - results["local", n][0]) / units
        connect, per_task = overheads[n]
        print(f"{n} worker(s): (dask wall - local wall) / units {overhead * 1000:+.0f} ms; client start-up "
              f"{connect:.0f} ms; scheduler round trip per task {per_task:.1f} ms (400 trivial tasks)")
    for n, by_worker in peaks.items():
        print(f"worker peak RSS with {n} worker(s): " + ", ".join(f"{mb:.0f} MB" for mb in by_worker.values()))
    identical = len({d for _, _, d in results.values()}) == 1
    print(f"outputs byte-identical: {identical}")
    print(f"cores: {multiprocessing.cpu_count()} (other processes on the machine slow every figure alike)")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
