"""A slide made of several files converts once: DICOM series (a real 2-file series OpenSlide reads),
MIRAX data folders and Hamamatsu VMS companions are grouped with their main file."""
from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
import yaml
from datasets import load_dataset
from PIL import Image

from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.slidefiles import dicom_series_uid, group_slide_files
from cpia_hf.dataset.units import discover_units
from cpia_hf.demo.synth import he_like_image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEGBaseline8Bit, generate_uid  # noqa: E402

WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
COMMON = {"organ": "skin", "disease": "unknown", "stain": "H&E", "field": "histopathology",
          "license": "unknown", "homepage": "unknown", "citation": "unknown"}


def write_dicom_level(path: Path, pixels: np.ndarray, mpp: float, series: str, number: int, tile: int = 256) -> None:
    """One pyramid level as a TILED_FULL JPEG DICOM WSI instance of `series`."""
    frames = []
    for y in range(0, pixels.shape[0], tile):
        for x in range(0, pixels.shape[1], tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = pixels[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            buffer = io.BytesIO()
            Image.fromarray(block).save(buffer, format="JPEG", quality=90)
            frames.append(buffer.getvalue())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = WSI_STORAGE, generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series, "SM", number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = pixels.shape[:2]
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames, ds.DimensionOrganizationType = len(frames), "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def write_dicom_slide(folder: Path, stem: str, pixels: np.ndarray, mpp: float) -> str:
    """A 2-file DICOM slide: level 0 in `<stem>_0.dcm`, a 4x reduced level in `<stem>_1.dcm`."""
    series = generate_uid()
    write_dicom_level(folder / f"{stem}_0.dcm", pixels, mpp, series, 1)
    write_dicom_level(folder / f"{stem}_1.dcm", np.asarray(Image.fromarray(pixels).reduce(4)), 4 * mpp, series, 2)
    return series


def test_dicom_series_converts_once(tmp_path):
    sources = tmp_path / "sources"
    (sources / "dicom").mkdir(parents=True)
    pixels = he_like_image(2048, 1536, seed=4, tissue=0.9)
    series = write_dicom_slide(sources / "dicom", "boxes", pixels, 0.25)
    other = write_dicom_slide(sources / "dicom", "other", he_like_image(1024, 1024, seed=5, tissue=0.9), 0.25)
    assert dicom_series_uid(sources / "dicom" / "boxes_1.dcm") == series != other
    for name in ("boxes_0.dcm", "boxes_1.dcm"):  # OpenSlide opens the slide from either file
        with openslide.OpenSlide(sources / "dicom" / name) as slide:
            assert slide.level_dimensions == ((2048, 1536), (512, 384))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "d", "kind": "wsi", "path": "dicom", "pattern": "*.dcm", **COMMON}]}))
    (entry,) = load_catalog(catalog)
    units = discover_units(entry, sources)
    assert [u.files for u in units] == [("dicom/boxes_0.dcm", "dicom/boxes_1.dcm"),
                                       ("dicom/other_0.dcm", "dicom/other_1.dcm")]
    result = subprocess.run([sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog), "--source-root",
                             str(sources), "--out", str(tmp_path / "out"), "--no-progress", "--configs", "full"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = load_dataset(str(tmp_path / "out"), "full", split="train").remove_columns("image").to_list()
    by_file = Counter(r["source_file"] for r in rows)
    assert set(by_file) == {"dicom/boxes_0.dcm", "dicom/other_0.dcm"}
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids))  # each slide once
    # 2048x1536 px at 0.25 um/px is 1036x777 standardised: 2x2 M tiles, one S each
    assert {i for i in ids if i.startswith("boxes_0-384-")} == {f"boxes_0-384-{x}-{y}" for x in (0, 1) for y in (0, 1)}
    assert Counter(r["scale"] for r in rows if r["source_file"] == "dicom/boxes_0.dcm") == {"M": 4, "S": 4}


def test_mirax_and_vms_companions_join_their_main_file(tmp_path):
    root = tmp_path
    (root / "s" / "A").mkdir(parents=True)
    for name in ("A.mrxs", "A/Index.dat", "A/Data0000.dat", "A/Slidedat.ini", "B.svs",
                 "C.vms", "C.jpg", "C_x1.jpg", "C.opt", "C_map.jpg", "D.jpg"):
        (root / "s" / name).write_bytes(b"x")
    (root / "s" / "C.vms").write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=C.jpg\n"
                                      "ImageFile(1,0)=C_x1.jpg\nMapFile=C_map.jpg\nOptimisationFile=C.opt\n")
    files = sorted(p.relative_to(root).as_posix() for p in (root / "s").rglob("*") if p.is_file())
    assert group_slide_files(files, root) == [
        ("s/A.mrxs", "s/A/Data0000.dat", "s/A/Index.dat", "s/A/Slidedat.ini"),
        ("s/B.svs",),
        ("s/C.vms", "s/C.jpg", "s/C.opt", "s/C_map.jpg", "s/C_x1.jpg"),
        ("s/D.jpg",),
    ]
