"""Peer tilers measured side by side with `cpia convert` on one real-texture slide.

    python benchmarks/peers.py                                # 40000 x 32000 at 0.2527 um/px (run under flock)
    python benchmarks/peers.py --width 16000 --height 12000 --repeats 3
    python benchmarks/peers.py --lazyslide-python /work/venvs/peers-lazyslide/bin/python \\
                               --tiatoolbox-python /work/venvs/peers-tiatoolbox/bin/python

The slide is built once (cached in --out) from the suite's real slide: its texture resampled to the
slide's MPP and mirrored into a mosaic (`cpia_hf.demo.synth.real_texture_image`), written as an Aperio
SVS (256-px JPEG tiles at q90, 4x pyramid). Every tiler then runs in its own child process, round-robin
for --repeats rounds, and JPEG-encodes its tiles at q90:

- cpia whole job: `cpia convert` (start-up, the unit of work of all four scales, packing, mini, card);
- cpia M scale: the M tiles of `iter_slide_tiles` encoded through the library (the cells are read
  for all the scales the rule keeps, only the M tiles are encoded);
- OpenSlide loop: `read_region` at the pyramid level below 0.4942 um/px, Lanczos to 384 px, for every
  384-px tile of the standard grid with >= 25 % tissue in an Otsu (saturation) thumbnail mask;
- LazySlide (`lazyslide` + `wsidata`), once with each reader given (default fastslide and openslide):
  `find_tissues`, `tile_tissues` at 384 px and 0.4942 um/px with background_fraction 0.75 (the
  25 % tissue rule), the tiles read and resized by `wsi.iter.tile_images` (OpenCV);
- TIAToolbox 2.x: `SlidingWindowPatchExtractor` at 0.4942 mpp, 384 px, Otsu mask, min_mask_ratio 0.25.

LazySlide and TIAToolbox run with the Python given by --lazyslide-python / --tiatoolbox-python (their
own virtual environments); a peer whose Python is absent or lacks the package is skipped with one
line. CPU-seconds and peak RSS are each child's own rusage (children included), taken from wait4.
Tissue recall and low-tissue tiles are measured against one reference mask: the library's tissue mask
(saturation above a clamped Otsu threshold) of a thumbnail at one pixel per 16 standard pixels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Only the standard library at the top: the parent's memory is inherited by each child's peak RSS (wait4),
# and the peer children run in virtual environments without this project.
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"
STANDARD_MPP = 0.4942  # cpia_hf.standard.STANDARD_MPP (checked in build_slide)
M_SIDE = 384
MIN_TISSUE = 0.25  # the default (mask) tissue rule's threshold
JPEG_QUALITY = 90
REFERENCE_PX = 16  # standard pixels per reference-mask pixel (the library's MASK_PX)


# ---------------------------------------------------------------------------------------------------------------
# children: each runs in its own process and writes {"tiles", "output_pixels", "rects", "versions"} to --result


def jpeg_q90(image) -> int:
    """Bytes of a Pillow image as JPEG at q90 (the peers' encoder; the library has its own)."""
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell()


def versions(*packages: str) -> dict[str, str]:
    """The installed versions of those of `packages` that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def child_cpia_m(slide: Path, options: dict) -> dict:
    sys.path.insert(0, str(REPO))
    from cpia_hf.dataset.imageio import encode_jpeg
    from cpia_hf.dataset.slide.tiles import iter_slide_tiles

    rects, encoded = [], 0
    for tile in iter_slide_tiles(slide, slide_stem=slide.stem):
        if tile.scale == "M":
            encoded += len(encode_jpeg(tile.pixels, quality=JPEG_QUALITY))
            rects.append((tile.x, tile.y, tile.width, tile.height))
    return dict(tiles=len(rects), output_pixels=len(rects) * M_SIDE ** 2, rects=rects, encoded_bytes=encoded,
                versions=versions("cpia-hf", "pillow", "openslide-python", "openslide-bin", "tifffile"))


def otsu_saturation_mask(thumbnail) -> "np.ndarray":
    """Tissue where the HSV saturation of an RGB thumbnail is above its Otsu threshold (OpenCV)."""
    import cv2
    import numpy as np

    saturation = cv2.cvtColor(np.asarray(thumbnail.convert("RGB")), cv2.COLOR_RGB2HSV)[..., 1]
    _, mask = cv2.threshold(saturation, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(bool)


def child_openslide(slide: Path, options: dict) -> dict:
    import openslide
    from PIL import Image

    with openslide.OpenSlide(str(slide)) as wsi:
        factor = STANDARD_MPP / float(wsi.properties[openslide.PROPERTY_NAME_MPP_X])  # level-0 px per output px
        level = wsi.get_best_level_for_downsample(factor)  # the finest level not coarser than 0.4942 um/px
        down = wsi.level_downsamples[level]
        width, height = wsi.dimensions
        thumb_down = factor * REFERENCE_PX
        mask = otsu_saturation_mask(wsi.get_thumbnail((round(width / thumb_down), round(height / thumb_down))))
        mask_scale = mask.shape[1] / width  # mask px per level-0 px
        side0 = M_SIDE * factor  # a tile's side in level-0 px
        read = round(side0 / down)
        rects, encoded = [], 0
        for row in range(int(height // side0)):
            for column in range(int(width // side0)):
                x, y = column * side0, row * side0
                box = mask[round(y * mask_scale):round((y + side0) * mask_scale),
                           round(x * mask_scale):round((x + side0) * mask_scale)]
                if box.size == 0 or box.mean() < MIN_TISSUE:
                    continue
                region = wsi.read_region((round(x), round(y)), level, (read, read)).convert("RGB")
                encoded += jpeg_q90(region.resize((M_SIDE, M_SIDE), Image.Resampling.LANCZOS))
                rects.append((x, y, side0, side0))
    return dict(tiles=len(rects), output_pixels=len(rects) * M_SIDE ** 2, rects=rects, encoded_bytes=encoded,
                versions=versions("openslide-python", "openslide-bin", "pillow", "opencv-python-headless"))


def child_lazyslide(slide: Path, options: dict) -> dict:
    import lazyslide as zs
    from PIL import Image
    from wsidata import open_wsi

    wsi = open_wsi(slide, store=None, reader=options["reader"])  # no zarr store written beside the slide
    zs.pp.find_tissues(wsi)
    # background_fraction: a tile with more background than this is dropped, so 0.75 keeps >= 25 % tissue
    zs.pp.tile_tissues(wsi, M_SIDE, mpp=STANDARD_MPP, background_fraction=1 - MIN_TISSUE)
    encoded = tiles = 0
    for tile in wsi.iter.tile_images("tiles"):
        encoded += jpeg_q90(Image.fromarray(tile.image))
        tiles += 1
    rects = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in wsi["tiles"].geometry.bounds.itertuples(index=False)]
    return dict(tiles=tiles, output_pixels=tiles * M_SIDE ** 2, rects=rects, encoded_bytes=encoded,
                versions=versions("lazyslide", "wsidata", options["reader"], "openslide-python", "openslide-bin", "pillow"))


def child_tiatoolbox(slide: Path, options: dict) -> dict:
    from PIL import Image
    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor

    # within_bound: whole patches only, as the other tilers (no padded patch at the slide's edges)
    extractor = SlidingWindowPatchExtractor(slide, patch_size=(M_SIDE, M_SIDE), input_mask="otsu",
                                            resolution=STANDARD_MPP, units="mpp", min_mask_ratio=MIN_TISSUE,
                                            within_bound=True)
    encoded = tiles = 0
    for patch in extractor:
        encoded += jpeg_q90(Image.fromarray(patch))
        tiles += 1
    factor = STANDARD_MPP / float(extractor.wsi.info.mpp[0])  # level-0 px per output px
    rects = [(x0 * factor, y0 * factor, (x1 - x0) * factor, (y1 - y0) * factor)
             for x0, y0, x1, y1 in extractor.coordinate_list.tolist()]
    return dict(tiles=tiles, output_pixels=tiles * M_SIDE ** 2, rects=rects, encoded_bytes=encoded,
                versions=versions("tiatoolbox", "openslide-python", "openslide-bin", "pillow"))


CHILDREN = {"cpia-m": child_cpia_m, "openslide": child_openslide, "lazyslide": child_lazyslide,
            "tiatoolbox": child_tiatoolbox}


def child_main(name: str, slide: Path, result: Path, options: dict) -> int:
    out = CHILDREN[name](slide, options)
    result.write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the parent: build the slide, run the tilers round-robin, measure, print the table


@dataclass
class Runner:
    """One tiler: how to start its child, and what it gave."""

    name: str
    command: list[str]
    cwd: Path = REPO
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    result: dict | None = None
    error: str | None = None


def run_measured(command: list[str], cwd: Path, env: dict | None = None) -> tuple[int, float, float, float, str]:
    """Run a child; its exit code, CPU-seconds (user + system, its children included), wall, peak RSS (MB), stderr."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    return process.returncode, usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss / 1024, text


def build_slide(args: argparse.Namespace) -> Path:
    """The benchmark slide (cached): built in a child process so that its memory is not this one's."""
    path = args.out / f"real-{args.width}x{args.height}-mpp{args.mpp:g}.svs".replace("0.", "0p")
    if path.exists():
        return path
    args.out.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from pathlib import Path; from cpia_hf.demo.synth import real_texture_image, write_slide; "
            "from cpia_hf.standard import STANDARD_MPP; "
            f"assert STANDARD_MPP == {STANDARD_MPP}; w, h, mpp = {args.width}, {args.height}, {args.mpp}; "
            f"tmp = Path({str(path)!r} + '.tmp'); "
            f"write_slide(tmp, real_texture_image(Path({str(FIXTURE)!r}), w, h, mpp), mpp, vendor='aperio', tile=256, "
            "quality=90); tmp.rename(tmp.with_suffix(''))")
    start = time.perf_counter()
    subprocess.run([str(args.python), "-c", code], cwd=REPO, check=True)
    print(f"built {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def convert_sources(slide: Path, work: Path) -> Path:
    """A one-entry catalog whose source folder holds (a link to) the slide; returns the catalog path."""
    sources = work / "sources"
    (sources / "wsi").mkdir(parents=True, exist_ok=True)
    link = sources / "wsi" / slide.name
    if not link.exists():
        link.symlink_to(slide.resolve())
    entry = dict(name="benchmark", kind="wsi", path="wsi", pattern=slide.name, organ="breast", disease="unknown",
                 stain="H&E", field="histopathology", license="unknown", homepage="unknown", citation="unknown")
    catalog = sources / "catalog.yaml"
    catalog.write_text(json.dumps({"version": 1, "entries": [entry]}))  # JSON is YAML
    return catalog


def convert_command(python: str, catalog: Path, out: Path) -> list[str]:
    return [python, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog), "--source-root", str(catalog.parent),
            "--out", str(out), "--no-progress"]


def runners(args: argparse.Namespace, slide: Path, work: Path) -> tuple[list[Runner], list[str]]:
    """The tilers to run, and one line for each peer skipped."""
    me = str(Path(__file__).resolve())
    ours = str(args.python)

    def child(name: str, python: str, **options) -> list[str]:
        return [python, me, "--child", name, "--slide", str(slide), "--result", str(work / f"{name}.json"),
                "--options", json.dumps(options)]

    found = [Runner("cpia convert (whole job)", convert_command(ours, convert_sources(slide, work), work / "dataset")),
             Runner("cpia M scale (library)", child("cpia-m", ours)),
             Runner("OpenSlide read_region loop", child("openslide", ours))]
    skipped = []
    for peer, python, extra in (("lazyslide", args.lazyslide_python, args.lazyslide_readers),
                                ("tiatoolbox", args.tiatoolbox_python, [None])):
        missing = peer_missing(peer, python)
        if missing:
            skipped.append(f"{peer}: skipped ({missing})")
            continue
        for reader in extra:
            label = f"LazySlide + {reader}" if peer == "lazyslide" else "TIAToolbox patch extractor"
            name = f"{peer}-{reader}" if reader else peer
            found.append(Runner(label, [str(python), me, "--child", peer, "--slide", str(slide), "--result",
                                        str(work / f"{name}.json"), "--options", json.dumps({"reader": reader})]))
    return found, skipped


def peer_missing(package: str, python: Path | None) -> str | None:
    """Why the peer cannot run (None when it can)."""
    if python is None or not Path(python).exists():
        return f"no Python at {python}; see docs/peers.md for its virtual environment"
    probe = subprocess.run([str(python), "-c", f"import {package}"], capture_output=True, text=True)
    if probe.returncode:
        return f"{python} cannot import {package}: {probe.stderr.strip().splitlines()[-1] if probe.stderr else '?'}"
    return None


def dataset_outputs(dataset: Path, python: str) -> dict:
    """Tiles and output pixels of a `cpia convert` output folder (all scales, full config)."""
    code = ("import json, sys, pyarrow.parquet as pq; from pathlib import Path; "
            "from cpia_hf.standard import SCALE_SIDES; tiles = pixels = 0\n"
            "for f in sorted(Path(sys.argv[1]).glob('data/full/*/*/*.parquet')):\n"
            "    for s in pq.read_table(f, columns=['scale']).column('scale').to_pylist():\n"
            "        tiles += 1; pixels += SCALE_SIDES[s] ** 2\n"
            "print(json.dumps(dict(tiles=tiles, output_pixels=pixels)))")
    found = subprocess.run([python, "-c", code, str(dataset)], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(found.stdout)


def round_robin(found: list[Runner], repeats: int, work: Path, python: str) -> None:
    import shutil

    for round_index in range(repeats):
        for runner in found:
            if runner.error:
                continue
            shutil.rmtree(work / "dataset", ignore_errors=True)
            code, cpu, wall, rss, stderr = run_measured(runner.command, runner.cwd)
            if code:
                runner.error = f"failed (exit {code}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
                print(f"  {runner.name}: {runner.error}", flush=True)
                continue
            runner.cpu.append(cpu)
            runner.wall.append(wall)
            runner.peak_rss_mb.append(rss)
            if runner.command[2:4] == ["cpia_hf.cli", "convert"]:
                runner.result = dataset_outputs(work / "dataset", python)
            else:
                runner.result = json.loads(Path(runner.command[runner.command.index("--result") + 1]).read_text())
            print(f"  round {round_index + 1}: {runner.name}: {cpu:.2f} CPU-s, {wall:.1f} s wall, {rss:.0f} MB",
                  flush=True)


def reference_metrics(slide: Path, found: list[Runner], work: Path, python: str) -> dict[str, dict]:
    """Tissue recall and low-tissue tiles of each runner's tiles against the reference mask (in a child)."""
    rect_files = {r.name: str(work / f"rects-{i}.json") for i, r in enumerate(found) if r.result and "rects" in r.result}
    for runner in found:
        if runner.name in rect_files:
            Path(rect_files[runner.name]).write_text(json.dumps(runner.result["rects"]))
    code = f"""
import json, sys
import numpy as np, openslide
from cpia_hf.dataset.tissue import tissue_mask
slide, files = sys.argv[1], json.loads(sys.argv[2])
with openslide.OpenSlide(slide) as wsi:
    down = {STANDARD_MPP} / float(wsi.properties[openslide.PROPERTY_NAME_MPP_X]) * {REFERENCE_PX}
    w, h = wsi.dimensions
    mask = tissue_mask(np.asarray(wsi.get_thumbnail((round(w / down), round(h / down))).convert("RGB")))
scale_x, scale_y = mask.shape[1] / w, mask.shape[0] / h
out = {{}}
for name, path in files.items():
    covered, low = np.zeros_like(mask), 0
    for x, y, tw, th in json.load(open(path)):
        box = (slice(round(y * scale_y), round((y + th) * scale_y)), slice(round(x * scale_x), round((x + tw) * scale_x)))
        covered[box] = True
        low += mask[box].size == 0 or mask[box].mean() < {MIN_TISSUE}
    out[name] = dict(recall=float((covered & mask).sum() / max(1, mask.sum())), low=int(low),
                     mask_fraction=float(mask.mean()))
print(json.dumps(out))
"""
    done = subprocess.run([python, "-c", code, str(slide), json.dumps(rect_files)], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode:
        print(f"reference mask: failed: {done.stderr.strip()[-500:]}")
        return {}
    return json.loads(done.stdout)


def print_table(found: list[Runner], skipped: list[str], metrics: dict[str, dict]) -> None:
    def per_cpu(runner: Runner) -> float:
        return runner.result["output_pixels"] / 1e6 / statistics.median(runner.cpu)

    done = [r for r in found if r.cpu]
    ours_m = next((per_cpu(r) for r in done if r.name.startswith("cpia M")), None)
    ours_whole = next((per_cpu(r) for r in done if r.name.startswith("cpia convert")), None)
    header = (f"{'tiler':<28} {'tiles':>6} {'out MP':>7} {'CPU-s':>7} {'wall s':>7} {'peak RSS':>9} {'MP/CPU-s':>9} "
              f"{'CPU/MP vs M':>11} {'vs whole':>8} {'recall':>7} {'low-tissue':>10}")
    print("\n" + header + "\n" + "-" * len(header))
    for runner in found:
        if not runner.cpu:
            print(f"{runner.name:<28} {runner.error or 'no run'}")
            continue
        rate = per_cpu(runner)
        metric = metrics.get(runner.name)
        recall = f"{metric['recall']:.1%}" if metric else "as M"
        low = f"{metric['low']} ({metric['low'] / max(1, runner.result['tiles']):.1%})" if metric else "as M"
        print(f"{runner.name:<28} {runner.result['tiles']:>6} {runner.result['output_pixels'] / 1e6:>7.0f} "
              f"{statistics.median(runner.cpu):>7.2f} {statistics.median(runner.wall):>7.1f} "
              f"{max(runner.peak_rss_mb):>6.0f} MB {rate:>9.1f} {ours_m / rate if ours_m else float('nan'):>10.2f}x "
              f"{ours_whole / rate if ours_whole else float('nan'):>7.2f}x {recall:>7} {low:>10}")
    for line in skipped:
        print(line)
    if metrics:
        fraction = next(iter(metrics.values()))["mask_fraction"]
        print(f"\nCPU-s, wall: median of the rounds; peak RSS: the largest. 'CPU/MP vs M': CPU-seconds per output MP "
              f"relative to the cpia M scale (>1: more CPU than ours). Recall: share of the reference mask's tissue "
              f"({fraction:.0%} of the slide; the library's tissue mask of a thumbnail at {REFERENCE_PX} standard px "
              f"per pixel) under the tiles; low-tissue: tiles with < {MIN_TISSUE:.0%} tissue in that mask.")
    for runner in done:
        if "versions" not in runner.result:  # the whole job: the library's versions, as the M scale's run
            runner.result["versions"] = next((r.result["versions"] for r in done if "versions" in r.result), {})
        print(f"versions, {runner.name}: " + ", ".join(f"{k} {v}" for k, v in runner.result.get("versions", {}).items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=32000)
    parser.add_argument("--mpp", type=float, default=0.2527)
    parser.add_argument("--repeats", type=int, default=2, help="round-robin rounds (median CPU reported)")
    parser.add_argument("--python", type=Path, default=Path(sys.executable), help="the Python with cpia-hf")
    parser.add_argument("--lazyslide-python", type=Path, default=Path("/work/venvs/peers-lazyslide/bin/python"))
    parser.add_argument("--lazyslide-readers", nargs="+", default=["fastslide", "openslide"])
    parser.add_argument("--tiatoolbox-python", type=Path, default=Path("/work/venvs/peers-tiatoolbox/bin/python"))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cpia-hf-peers",
                        help="where the slide is cached")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, args.slide, args.result, json.loads(args.options))
    slide = build_slide(args)
    with tempfile.TemporaryDirectory(prefix="cpia-peers-") as work_dir:
        work = Path(work_dir)
        found, skipped = runners(args, slide, work)
        print(f"slide {slide.name}; {len(found)} tilers, {args.repeats} round(s)", flush=True)
        round_robin(found, args.repeats, work, str(args.python))
        print_table(found, skipped, reference_metrics(slide, found, work, str(args.python)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
