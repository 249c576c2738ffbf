"""Source catalog of the CPIA release: one validated entry per released sub-dataset.

The catalog (conversion/catalog.yaml, installed as `cpia_hf.conversion`) says where each source's files are and
which metadata every row of that subset carries (organ, disease, stain, field, licence), and on what evidence its
licence rests (`license_status`, `license_source`, `license_evidence`; see docs/sources.md).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import yaml

from ..resources import CATALOG, resource_path
from ..standard import MPP_RANGE, SCALES

UNKNOWN = "unknown"
KINDS = ("wsi", "roi")
FIELDS_OF_STUDY = ("histopathology", "cytopathology")
ROI_SCALES = ("L", "M", "S")
LABEL_SOURCES = ("parent",)
# How a source is obtained: a plain download, an account/registration (Kaggle, grand-challenge, a form), a
# signed data-use agreement, the NBIA Data Retriever with a TCIA manifest, or gdc-client with a GDC manifest.
ACCESS = ("open", "registration", "agreement", "tcia", "gdc", UNKNOWN)
# What a licence rests on: the owner's own page or file (owner), a mirror or third-party catalogue (second-hand),
# statements that disagree (conflict), or nothing found (unknown).
LicenceStatus = Literal["owner", "second-hand", "conflict", "unknown"]
LICENCE_STATUSES: tuple[str, ...] = get_args(LicenceStatus)

# Organ vocabulary of Table I of the CPIA paper, lower case ("Brian" in the table is brain).
ORGANS: tuple[str, ...] = (
    "adrenal gland", "bladder", "blood", "bone", "bone marrow", "brain", "breast", "canine cutaneous",
    "cervix uteri", "colon", "colorectum", "connective tissue", "eye and adnexa", "head and neck", "kidney",
    "liver", "lung", "lymph", "oral cavity", "ovary", "pancreas", "prostate", "skin", "stomach", "testis",
    "thyroid", "uterus", "multiple organs",
)

REQUIRED_TEXT = ("name", "kind", "path", "pattern", "organ", "disease", "stain", "field", "license", "homepage",
                 "citation")
OPTIONAL = ("scale", "label_from", "train_pattern", "mpp", "released_names", "expected_images", "access", "benchmarks",
            "license_status", "license_source", "license_evidence")
OPTIONAL_TEXT = ("scale", "label_from", "train_pattern", "license_source", "license_evidence")
ROI_ONLY = ("scale", "label_from", "train_pattern")
WSI_ONLY = ("mpp",)


class CatalogError(ValueError):
    """A catalog that does not follow the schema; the message names the file, the entry and the problem."""


@dataclass(frozen=True)
class CatalogEntry:
    """One released sub-dataset: where its source files are and the metadata of its rows."""

    name: str
    kind: str
    path: str
    pattern: str
    organ: str
    disease: str
    stain: str
    field: str
    license: str
    homepage: str
    citation: str
    scale: str | None = None  # ROI only: the release scale (L, M or S) of every image
    label_from: str | None = None  # ROI only: "parent" = class is the parent folder name
    train_pattern: str | None = None  # ROI only: the training split's files (CPIA-Mini keeps only these)
    mpp: float | None = None  # WSI only: um/px to use when the slides carry none
    released_names: dict[str, str] = dataclasses.field(default_factory=dict)  # scale -> released folder name
    expected_images: dict[str, int] = dataclasses.field(default_factory=dict)  # scale -> released image count
    access: str = UNKNOWN  # one of ACCESS: how the source is obtained
    # public benchmarks (names and Hub dataset ids) whose images come from this source: clean configs leave it out
    benchmarks: tuple[str, ...] = ()
    # the licence's provenance: None only in catalogs that record none (then `cpia push` judges the licence alone)
    license_status: LicenceStatus | None = None
    license_source: str | None = None  # URL of the page or file that states the licence
    license_evidence: str | None = None  # who says it and the phrase that says it

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping in catalog.yaml form (unset optional fields left out), loadable again."""
        values = dataclasses.asdict(self)
        values["benchmarks"] = list(self.benchmarks)
        return {key: value for key, value in values.items() if value is not None and value not in ({}, [])}


def folder_safe(text: str) -> str:
    """Folder-safe form of a text: keep [A-Za-z0-9._-], replace every other run with `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def subset_slug(name: str) -> str:
    """Folder name of a subset (`folder_safe` of its name)."""
    return folder_safe(name)


def default_catalog_path() -> Path:
    """The release catalog (`conversion/catalog.yaml`, shipped with the package)."""
    return resource_path(CATALOG)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r} (first given at line {first_line})")


class UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (on libyaml where PyYAML has it: several times faster on the release catalog), refusing
    a mapping that gives one key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document of `path`, refusing duplicate keys."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)


def load_catalog(path: str | Path) -> list[CatalogEntry]:
    """Read and validate a catalog file; raise CatalogError naming the file, entry and problem."""
    path = Path(path)
    try:
        document = read_yaml(path)
    except DuplicateKeyError as error:
        raise CatalogError(f"{path}: {error}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CatalogError(f"{path}: cannot read catalog: {error}") from error
    if not isinstance(document, dict):
        raise CatalogError(f"{path}: expected a mapping with keys version, source_root_note, entries")
    extra = set(document) - {"version", "source_root_note", "entries"}
    if extra:
        raise CatalogError(f"{path}: unknown top-level key(s) {sorted(extra)}")
    if document.get("version") != 1:
        raise CatalogError(f"{path}: unsupported version {document.get('version')!r} (expected 1)")
    if not isinstance(document.get("source_root_note", ""), str):
        raise CatalogError(f"{path}: source_root_note must be a string")
    raw_entries = document.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise CatalogError(f"{path}: entries must be a non-empty list")

    entries: list[CatalogEntry] = []
    slugs: dict[str, str] = {}
    for index, raw in enumerate(raw_entries):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{path}: entry {index} ({name!r})"
        try:
            entry = _validate_entry(raw)
        except ValueError as error:
            raise CatalogError(f"{where}: {error}") from None
        slug = subset_slug(entry.name).lower()  # folders must differ on case-insensitive file systems too
        if slug in slugs:
            what = "duplicate name" if slugs[slug] == entry.name else f"folder name clashes with {slugs[slug]!r}"
            raise CatalogError(f"{where}: {what}")
        slugs[slug] = entry.name
        entries.append(entry)
    return entries


# A small explicit validator rather than jsonschema: it is not a dependency, and the cross-field rules
# (ROI-only keys, per-scale counts, vocabulary) read more plainly as code.
def _validate_entry(raw: Any) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - set(REQUIRED_TEXT) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    missing = [key for key in REQUIRED_TEXT if key not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    for key in REQUIRED_TEXT + OPTIONAL_TEXT:
        if key in raw and not (isinstance(raw[key], str) and raw[key].strip()):
            raise ValueError(f"{key} must be a non-empty string, got {raw[key]!r}")

    if subset_slug(raw["name"]) in (".", ".."):
        raise ValueError(f"name {raw['name']!r} gives no usable folder name")
    kind = raw["kind"]
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if raw["organ"] not in ORGANS + (UNKNOWN,):
        raise ValueError(f"organ {raw['organ']!r} is not in the organ vocabulary (cpia_hf.dataset.catalog.ORGANS)")
    if raw["field"] not in FIELDS_OF_STUDY:
        raise ValueError(f"field {raw['field']!r} is not one of {FIELDS_OF_STUDY}")
    if raw["homepage"] != UNKNOWN and not raw["homepage"].startswith(("https://", "http://")):
        raise ValueError(f"homepage {raw['homepage']!r} is neither a URL nor {UNKNOWN!r}")
    for key in ("path", "pattern", "train_pattern"):
        if key in raw and (raw[key].startswith("/") or ".." in PurePosixPath(raw[key]).parts):
            raise ValueError(f"{key} {raw[key]!r} must be relative and stay inside the source root")

    misplaced = [key for key in (ROI_ONLY if kind == "wsi" else WSI_ONLY) if key in raw]
    if misplaced:
        raise ValueError(f"{misplaced} not allowed for a {kind} entry")
    if kind == "roi" and raw.get("scale") not in ROI_SCALES:
        raise ValueError(f"an roi entry needs scale in {ROI_SCALES}, got {raw.get('scale')!r}")
    if "label_from" in raw and raw["label_from"] not in LABEL_SOURCES:
        raise ValueError(f"label_from {raw['label_from']!r} is not one of {LABEL_SOURCES}")
    if raw.get("access", UNKNOWN) not in ACCESS:
        raise ValueError(f"access {raw['access']!r} is not one of {ACCESS}")
    status = _licence_status(raw)
    benchmarks = raw.get("benchmarks", [])
    if not isinstance(benchmarks, list) or not all(isinstance(b, str) and b.strip() for b in benchmarks):
        raise ValueError(f"benchmarks must be a list of non-empty names or Hub ids, got {benchmarks!r}")
    mpp = raw.get("mpp")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float))
                            or not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise ValueError(f"mpp must be a number of um/px within the plausible range {MPP_RANGE[0]}-{MPP_RANGE[1]}, "
                         f"got {mpp!r}")

    allowed_scales = SCALES if kind == "wsi" else (raw["scale"],)
    released_names = _per_scale(raw, "released_names", allowed_scales, str)
    expected_images = _per_scale(raw, "expected_images", allowed_scales, int)
    return CatalogEntry(**{**raw, "mpp": None if mpp is None else float(mpp),
                           "released_names": released_names, "expected_images": expected_images,
                           "benchmarks": tuple(benchmarks), "license_status": status})


def _licence_status(raw: dict) -> str | None:
    """The entry's licence status, checked against its licence and evidence (unknown licence -> "unknown")."""
    status = raw.get("license_status", UNKNOWN if raw["license"] == UNKNOWN else None)
    if status is None:
        return None
    if status not in LICENCE_STATUSES:
        raise ValueError(f"license_status {status!r} is not one of {LICENCE_STATUSES}")
    if (status == UNKNOWN) != (raw["license"] == UNKNOWN):
        raise ValueError(f"license {raw['license']!r} with license_status {status!r}: "
                         f"a licence is {UNKNOWN!r} exactly when its status is")
    source = raw.get("license_source")
    if source is not None and not source.startswith(("https://", "http://")):
        raise ValueError(f"license_source {source!r} is not a URL")
    if status != UNKNOWN and source is None:
        raise ValueError(f"license {raw['license']!r} ({status}) needs license_source: the URL that states it")
    if status in ("second-hand", "conflict") and "license_evidence" not in raw:
        raise ValueError(f"license_status {status!r} needs license_evidence: who states the licence, in their words")
    return status


def _per_scale(raw: dict, key: str, allowed_scales: tuple[str, ...], value_type: type) -> dict:
    values = raw.get(key, {})
    if not isinstance(values, dict):
        raise ValueError(f"{key} must be a mapping scale -> value, got {values!r}")
    for scale, value in values.items():
        if scale not in allowed_scales:
            raise ValueError(f"{key} has scale {scale!r}; allowed here: {allowed_scales}")
        if value_type is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key}[{scale}] must be a non-negative integer, got {value!r}")
        if value_type is str and not (isinstance(value, str) and value):
            raise ValueError(f"{key}[{scale}] must be a non-empty string, got {value!r}")
    return dict(values)
