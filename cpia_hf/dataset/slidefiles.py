"""Which files make one slide: formats OpenSlide reads from several files become one unit, not one per file.

- DICOM (`.dcm`): a slide is a series, its levels and images in separate files of one folder, tied by
  their SeriesInstanceUID (0020,000E); OpenSlide opens it from any of its files and finds the others.
- MIRAX (`.mrxs`): the main file plus every file of the folder of the same name beside it.
- Hamamatsu VMS (`.vms`): the main file plus the image, map and optimisation files it lists.
The main file comes first (the one OpenSlide opens; the slide takes its name); the others follow, so that
the unit's fingerprint covers every file and a change to any of them reconverts the slide.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

SERIES_UID_TAG = b"\x20\x00\x0e\x00"  # (0020,000E) in little-endian byte order
HEADER_BYTES = 1 << 20  # the series UID lies in the header, long before the pixel data
VMS_KEYS = re.compile(r"^\s*(ImageFile(\(\d+,\d+\))?|MapFile|OptimisationFile|MacroImage)\s*=\s*(.+?)\s*$", re.I)


def dicom_series_uid(path: Path) -> str | None:
    """SeriesInstanceUID of a DICOM file (explicit or implicit VR little endian), None when not found."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
    except OSError:
        return None
    for match in re.finditer(re.escape(SERIES_UID_TAG), header):
        start = match.end()
        if header[start:start + 2] == b"UI":  # explicit VR: 2-byte length
            length, value_at = int.from_bytes(header[start + 2:start + 4], "little"), start + 4
        else:  # implicit VR: 4-byte length
            length, value_at = int.from_bytes(header[start:start + 4], "little"), start + 4
        value = header[value_at:value_at + length].rstrip(b"\x00 ")
        if 0 < length <= 64 and re.fullmatch(rb"[0-9.]+", value):
            return value.decode()
    return None


def _vms_companions(path: Path) -> list[Path]:
    """The files a Hamamatsu .vms lists (image tiles, map, optimisation, macro), those that exist."""
    try:
        lines = path.read_text(encoding="latin-1").splitlines()
    except OSError:
        return []
    named = [match.group(3) for line in lines if (match := VMS_KEYS.match(line))]
    return [path.parent / name for name in named if (path.parent / name).is_file()]


def group_slide_files(files: list[str], source_root: Path) -> list[tuple[str, ...]]:
    """The slides among `files` (posix paths relative to `source_root`), each as (main file, companions...),
    in the order of their main files. Files that belong to another slide are not slides of their own."""
    def relative(path: Path) -> str:
        return path.relative_to(source_root).as_posix()

    companions: dict[str, list[str]] = {}
    for file in files:
        path = source_root / file
        suffix = PurePosixPath(file).suffix.lower()
        if suffix == ".mrxs":
            data = path.with_suffix("")
            companions[file] = sorted(relative(p) for p in data.rglob("*") if p.is_file()) if data.is_dir() else []
        elif suffix == ".vms":
            companions[file] = sorted(relative(p) for p in _vms_companions(path))
    series: dict[tuple[str, str], list[str]] = defaultdict(list)
    for file in files:
        if PurePosixPath(file).suffix.lower() == ".dcm":
            uid = dicom_series_uid(source_root / file)
            series[(str(PurePosixPath(file).parent), uid or file)].append(file)
    for members in series.values():
        companions[min(members)] = sorted(members)[1:]
    taken = {c for cs in companions.values() for c in cs}
    return [(file, *companions.get(file, ())) for file in files if file not in taken]
