"""Write DICOM files for the tests: images wrapped with pydicom, and pydicom's bundled test
files, each carrying planted identifiers (names, IDs, dates, UIDs, a private tag, nested
sequences) that no output may contain.

``Planted`` records every value written, so a test can search the outputs for all of them.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

MAMMO = "1.2.840.10008.5.1.4.1.1.1.2"   # Digital Mammography X-Ray Image Storage - For Presentation
US = "1.2.840.10008.5.1.4.1.1.6.1"      # Ultrasound Image Storage
ROOT_UID = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root; planted UIDs below it are long and unique
BIRTH_DATE = "19310417"
INSTITUTION = "SAINT PLANTED HOSPITAL"
REFERRING = "HOUSE^GREGORY"
PRIVATE_CREATOR = "ACME PLANTED"


@dataclass
class Planted:
    """Every identifying value written into the layout (file contents, names and folders)."""

    values: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)

    def needles(self) -> list[str]:
        out = set()
        for v in map(str, self.values | self.uids):
            out |= {v, v.upper(), v.lower(), v.replace("^", " ")}
        return sorted(out, key=len, reverse=True)


def patient_values(p: int) -> dict:
    """Planted header values of patient ``p``."""
    return {"PatientName": f"DOE^JOHN{p:02d}", "PatientID": f"MRN{123456 + p}",
            "PatientBirthDate": BIRTH_DATE, "InstitutionName": INSTITUTION,
            "ReferringPhysicianName": REFERRING,
            "StudyInstanceUID": f"{ROOT_UID}7731{p:04d}"}


def image(seed: int, cancer: bool, size: int = 64) -> np.ndarray:
    """uint8 smooth random tissue plus fine texture (distinct per seed, also to a perceptual
    hash), and a bright disc for 'cancer'."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    grid = rng.integers(30, 150, (6, 6), dtype=np.uint8)
    tissue = np.asarray(Image.fromarray(grid, "L").resize((size, size), Image.Resampling.BICUBIC))
    a = tissue.astype(np.float64) + rng.normal(0, 12, (size, size))
    if cancer:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] += 110
    return np.clip(a, 0, 255).astype(np.uint8)


def plant(ds: Dataset, p: int, k: int, planted: Planted) -> Dataset:
    """Identifiers of patient ``p`` (file ``k``) into standard tags, a private tag and nested
    sequences of ``ds``; every UID of the result is recorded as planted."""
    vals = patient_values(p)
    for kw, v in vals.items():
        setattr(ds, kw, v)
    ds.AccessionNumber = f"ACC{987000 + 100 * p + k}"
    ds.SOPInstanceUID = f"{ROOT_UID}8842{p:04d}{k:04d}"
    ds.SeriesInstanceUID = f"{ROOT_UID}9953{p:04d}"
    ds.StudyDate = "20190311"
    ds.OperatorsName = f"TECH^PLANTED{p:02d}"
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"PRIVSECRET{p:02d}{k:02d}")
    other = Dataset()
    other.PatientID = f"NESTEDMRN{p:04d}"
    other.IssuerOfPatientID = "PLANTED ISSUER"
    ds.OtherPatientIDsSequence = Sequence([other])
    req = Dataset()
    req.AccessionNumber = f"NESTACC{p:02d}{k:02d}"
    req.RequestedProcedureID = f"NESTPROC{p:02d}{k:02d}"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = f"{ROOT_UID}6611{p:04d}{k:04d}"
    inner.ReferencedSOPClassUID = MAMMO
    req.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([req])
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    planted.values |= {str(v) for v in (vals["PatientName"], vals["PatientID"], BIRTH_DATE, INSTITUTION, REFERRING,
                       ds.AccessionNumber, ds.OperatorsName, f"PRIVSECRET{p:02d}{k:02d}",
                       other.PatientID, "PLANTED ISSUER", req.AccessionNumber,
                       req.RequestedProcedureID, PRIVATE_CREATOR)}
    planted.uids |= uids_of(ds)
    return ds


def uids_of(ds: Dataset) -> set[str]:
    """Every instance UID in ``ds`` (nested too) and its file meta: not the standard's own
    (1.2.840.10008.*) nor pydicom's implementation UID."""
    found = set()

    def visit(d):
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.VR == "UI" and elem.value:
                values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
                found.update(str(v) for v in values)

    visit(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        found.add(str(meta.MediaStorageSOPInstanceUID))
    return {u for u in found if not u.startswith("1.2.840.10008.") and len(u) > 12
            and u != pydicom.uid.PYDICOM_IMPLEMENTATION_UID}


def wrap(pixels: np.ndarray, path: Path, p: int, k: int, planted: Planted, *,
         modality: str = "MG", sop_class: str = MAMMO, burned_in: str | None = None) -> Path:
    """Write ``pixels`` (2-D uint8, or 3-D frames x rows x cols) as an uncompressed DICOM."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    frames = pixels if pixels.ndim == 3 else None
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames is not None:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    plant(ds, p, k, planted)
    ds.save_as(path, enforce_file_format=True)
    return path


def bundled(name: str, path: Path, p: int, k: int, planted: Planted) -> Path:
    """One of pydicom's bundled test files, with planted identifiers; its own UIDs (before
    and after planting) are recorded too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    src = get_testdata_file(name)
    ds = pydicom.dcmread(src)
    planted.uids |= uids_of(ds)
    plant(ds, p, k, planted)
    ds.save_as(path, enforce_file_format=True)
    return path


def copy_as(src: Path, dst: Path) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
