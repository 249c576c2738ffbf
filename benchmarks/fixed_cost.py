"""The fixed cost of a one-slide `cpia convert` run: whole-run CPU-seconds minus the unit of work's.

    python benchmarks/fixed_cost.py                       # 16000 x 12000 real-texture slide at 0.2527 um/px
    python benchmarks/fixed_cost.py --width 40000 --height 32000 --repeats 3

Alternates, for --repeats rounds, (a) the whole `cpia convert` on a one-entry catalog holding the
slide, in a child process (start-up and imports, the worker, the unit, packing full + mini, the card),
and (b) the unit of work alone (`convert_unit`: tiles of all scales, JPEG, the Parquet unit file),
timed inside a child process after its imports (the slide readers' too). The fixed cost is the difference of the medians
(and, less sensitive to other load on the machine, of the fastest rounds). Also
prints the CPU of the card alone (rewritten on the run's output in a child process) and of the imports a
convert run starts with, and which heavy packages they load.
The slide is the one benchmarks/peers.py builds (cached in --out).

The children run with Python's bytecode cached, as in an installed package (pip compiles it on install), in a
private cache folder that one untimed run fills first, even where PYTHONDONTWRITEBYTECODE is set;
--no-bytecode-cache measures with the environment as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (the slide, the catalog and the measured child runs)

HEAVY = ("datasets", "pandas", "matplotlib", "torch", "huggingface_hub", "dask", "distributed", "sklearn", "scipy")

UNIT = """
import json, resource, sys, time
from cpia_hf.cli import set_up_process
set_up_process("convert")  # as `cpia convert` runs (before numpy is imported)
from pathlib import Path
from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.units import ConvertOptions, convert_unit, discover_units
import cpia_hf.dataset.slide.readers, cpia_hf.dataset.slide.tiles, cpia_hf.dataset.tissue  # noqa: F401,E401  (start-up)
from cpia_hf.schema import arrow_without_pandas

arrow_without_pandas()  # as in a `cpia convert` worker

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

catalog, work = Path(sys.argv[1]), Path(sys.argv[2])
(unit,) = discover_units(load_catalog(catalog)[0], catalog.parent)
start = cpu()
result = convert_unit(unit, catalog.parent, work, ConvertOptions())
print(json.dumps(dict(cpu=cpu() - start, rows=result.rows)))
"""

CARD = """
import json, resource, sys
from pathlib import Path
from cpia_hf.dataset.card import write_dataset_card
from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.mini import DEFAULT_MINI_FRACTION
from cpia_hf.dataset.units import ConvertOptions

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

start = cpu()
write_dataset_card(Path(sys.argv[2]), load_catalog(Path(sys.argv[1])), configs=("full", "mini"),
                   mini_fraction=DEFAULT_MINI_FRACTION, options=ConvertOptions())
print(json.dumps(dict(cpu=cpu() - start)))
"""

IMPORTS = """
import json, resource, sys
before = set(sys.modules)
from cpia_hf.cli import set_up_process
set_up_process("convert")  # as `cpia convert` runs (before numpy is imported)
import cpia_hf.cli
from cpia_hf.cli import build_parser
build_parser("convert")
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(cpu=usage.ru_utime + usage.ru_stime, heavy=sorted({m.split(".")[0] for m in sys.modules} & set(%r)))))
""" % (HEAVY,)


def child_env(work: Path, bytecode_cache: bool) -> dict:
    """The children's environment: bytecode written to and read from a private cache folder, or as it is."""
    if not bytecode_cache:
        return dict(os.environ)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(work / "pycache")}


def child_json(python: str, code: str, args: list[Path], env: dict) -> dict:
    done = subprocess.run([python, "-c", code, *map(str, args)], cwd=peers.REPO, capture_output=True, text=True,
                          check=True, env=env)
    return json.loads(done.stdout)


def whole_run(python: str, catalog: Path, out: Path, env: dict) -> tuple[float, float]:
    """CPU-seconds and wall seconds of a whole `cpia convert` into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    code, cpu, seconds, _, stderr = peers.run_measured(peers.convert_command(python, catalog, out), peers.REPO, env)
    if code:
        raise SystemExit(f"cpia convert failed: {stderr[-2000:]}")
    return cpu, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16000)
    parser.add_argument("--height", type=int, default=12000)
    parser.add_argument("--mpp", type=float, default=0.2527)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--python", type=Path, default=Path(sys.executable), help="the Python with cpia-hf")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cpia-hf-peers",
                        help="where the slide is cached")
    parser.add_argument("--no-bytecode-cache", dest="bytecode_cache", action="store_false",
                        help="run the children with the environment's bytecode setting (see above)")
    args = parser.parse_args()
    slide = peers.build_slide(args)
    python = str(args.python)
    whole, unit, card, wall, rows = [], [], [], [], None
    with tempfile.TemporaryDirectory(prefix="cpia-fixed-") as work_dir:
        work = Path(work_dir)
        catalog = peers.convert_sources(slide, work)
        env = child_env(work, args.bytecode_cache)
        if args.bytecode_cache:
            whole_run(python, catalog, work / "dataset", env)  # fills the bytecode cache
        for _ in range(args.repeats):
            cpu, seconds = whole_run(python, catalog, work / "dataset", env)
            whole.append(cpu)
            wall.append(seconds)
            shutil.rmtree(work / "unit", ignore_errors=True)
            measured = child_json(python, UNIT, [catalog, work / "unit"], env)
            unit.append(measured["cpu"])
            rows = measured["rows"]
            card.append(child_json(python, CARD, [catalog, work / "dataset"], env)["cpu"])
        imports = child_json(python, IMPORTS, [], env)
    fixed = statistics.median(whole) - statistics.median(unit)
    print(f"slide {slide.name}: {rows} rows; {args.repeats} round(s), medians; bytecode "
          f"{'cached' if args.bytecode_cache else 'as the environment has it'}")
    print(f"  whole cpia convert   {statistics.median(whole):6.2f} CPU-s ({statistics.median(wall):.1f} s wall)"
          f"   rounds: {', '.join(f'{c:.2f}' for c in whole)}")
    print(f"  unit of work         {statistics.median(unit):6.2f} CPU-s"
          f"   rounds: {', '.join(f'{c:.2f}' for c in unit)}")
    print(f"  fixed cost           {fixed:6.2f} CPU-s (whole run minus unit of work)")
    print(f"  fixed cost, best     {min(whole) - min(unit):6.2f} CPU-s (fastest whole run minus fastest unit of work: "
          "a busy machine only adds CPU)")
    print(f"  of which the card    {statistics.median(card):6.2f} CPU-s (README, organ chart, galleries; rewritten alone)")
    print(f"  start-up imports     {imports['cpu']:6.2f} CPU-s (python, `cpia convert` parser); heavy packages loaded: "
          f"{', '.join(imports['heavy']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
