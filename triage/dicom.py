"""Reading DICOM pixels into a greyscale image, from the de-identified header only.

One concept: a DICOM Part 10 file -> a 2-D uint8 greyscale array (ready for a lossless PNG) plus its
de-identified header, or a quarantine reason. ``read_dicom`` never raises on a bad file, and the `detail` and
`notes` it returns never quote a header value that could identify anyone, nor the file's name: they name
only our own rules and a few technical values from the keep-list (transfer syntax, modality, frame counts).

Pixel pipeline (deterministic: float64 numpy, round-half-even):
decode (pydicom) -> one frame -> Modality LUT (``apply_modality_lut``: Rescale Slope/Intercept or Modality
LUT Sequence) -> VOI: the `window` (center, width) given by the caller (linear, PS3.3 C.11.2.1.2), else the
file's first VOI LUT (``apply_voi``, scaled by that LUT's own output range), else the file's first window
(its VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID), else min-max over the frame -> MONOCHROME1
inverted -> x255, rounded to uint8. Colour (RGB, YBR_* decoded to RGB, PALETTE COLOR) becomes luma
(0.299 R + 0.587 G + 0.114 B, scaled by its bit depth); windows do not apply to colour.

Not handled (limits): text burned into pixels is found only through the header rules below (no OCR);
enhanced multi-frame objects' per-frame functional groups (their rescale/window) are not read (min-max then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi

from triage.deid import deidentify, patient_of, quiet_pydicom
from triage.errors import ParamsError

DICOM_PREAMBLE_OFFSET = 128
_MAGIC = b"DICM"

MULTI_FRAME_RULES = ("middle", "first", "quarantine")
BURNED_IN_RULES = ("quarantine", "mask", "keep")
QUARANTINE_REASONS = ("dicom_compressed", "dicom_unreadable", "burned_in", "dicom_no_pixels", "multi_frame")

# Where text is routinely burned into the pixels unless the file says BurnedInAnnotation NO.
BURNED_IN_MODALITIES = frozenset({"US", "OT", "SC"})
# SOP classes matched as dotted prefixes (the class itself or "<prefix>.<anything>", so 1.1.6 does not match
# Segmentation 1.1.66.4): Ultrasound (1.1.6, 1.1.6.x, incl. retired) and Ultrasound Multi-frame (1.1.3, 1.1.3.1),
# Secondary Capture (1.1.7, 1.1.7.x) and VL images (1.1.77.1.x: photographs, endoscopy, slide labels).
BURNED_IN_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.6",
    "1.2.840.10008.5.1.4.1.1.3",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.77.1",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_CONVERT_HINT = "decompress it first (e.g. dcmdjpeg / dcmdjpls, or gdcmconv --raw) or install a pydicom decoding plugin"


def is_dicom_bytes(head: bytes) -> bool:
    """True when `head` (a file's first bytes) has the Part 10 marker b"DICM" after the 128-byte preamble."""
    return head[DICOM_PREAMBLE_OFFSET : DICOM_PREAMBLE_OFFSET + 4] == _MAGIC


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file at `path` starts like a DICOM Part 10 file (reads 132 bytes; False if unreadable)."""
    try:
        with open(path, "rb") as f:
            return is_dicom_bytes(f.read(DICOM_PREAMBLE_OFFSET + 4))
    except OSError:
        return False


@dataclass
class DicomImage:
    pixels: np.ndarray | None  # 2-D uint8 greyscale (None if rejected)
    header: Dataset | None  # de-identified (deidentify) -- never the original
    patient: str  # patient pseudonym ("" when the file could not be parsed at all)
    reason: str | None  # quarantine reason (QUARANTINE_REASONS) or None
    detail: str | None  # human text, without any identifying header value or the file's name
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None


def _check_params(window, multi_frame: str, burned_in: str, mask_border: int, dates: str) -> None:
    if multi_frame not in MULTI_FRAME_RULES:
        raise ParamsError(f"multi_frame must be one of {MULTI_FRAME_RULES}, got {multi_frame!r}")
    if burned_in not in BURNED_IN_RULES:
        raise ParamsError(f"burned_in must be one of {BURNED_IN_RULES}, got {burned_in!r}")
    if not isinstance(mask_border, int) or mask_border < 0:
        raise ParamsError(f"mask_border must be an integer >= 0, got {mask_border!r}")
    if burned_in == "mask" and mask_border == 0:
        raise ParamsError("burned_in: mask needs mask_border > 0 (a 0-pixel border masks nothing)")
    if dates not in ("shift", "remove"):
        raise ParamsError(f"dates must be 'shift' or 'remove', got {dates!r}")
    if window is not None:
        try:
            center, width = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ParamsError(f"window must be (center, width), got {window!r}") from None
        if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
            raise ParamsError(f"window width must be >= 1 and both values finite, got {window!r}")


def read_dicom(
    path,
    key: bytes,
    *,
    window=None,
    multi_frame: str = "middle",
    burned_in: str = "quarantine",
    mask_border: int = 0,
    dates: str = "shift",
) -> DicomImage:
    """Read one DICOM file into a de-identified header and a uint8 greyscale image, or a quarantine reason.

    Bad parameters raise ParamsError; a bad file never raises (reason/detail say why).
    """
    _check_params(window, multi_frame, burned_in, mask_border, dates)
    with quiet_pydicom():
        if not is_dicom_file(path):
            return _unreadable("no DICM marker at byte 128 (not a DICOM Part 10 file)")
        try:
            original = pydicom.dcmread(path)
        except Exception as exc:
            return _unreadable(f"pydicom could not parse the file ({type(exc).__name__})")
        try:
            patient = patient_of(original, key)
            header = deidentify(original, key, dates=dates)
        except Exception as exc:
            return _unreadable(f"the header could not be de-identified ({type(exc).__name__})")
        del original
        image = DicomImage(None, header, patient, None, None)
        try:
            _pixels(image, window=window, multi_frame=multi_frame, burned_in=burned_in, mask_border=mask_border)
        except Exception as exc:  # anything unforeseen: quarantine, never a traceback
            _reject(image, "dicom_unreadable", f"the pixel data could not be processed ({type(exc).__name__})")
        return image


def _unreadable(detail: str) -> DicomImage:
    return DicomImage(None, None, "", "dicom_unreadable", detail)


def _reject(image: DicomImage, reason: str, detail: str) -> None:
    image.pixels, image.reason, image.detail = None, reason, detail


def _cs(header: Dataset, keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip().upper()


def _burned_in_reason(header: Dataset) -> str | None:
    flag = _cs(header, "BurnedInAnnotation")
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    modality = _cs(header, "Modality")
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} routinely carries burned-in text and BurnedInAnnotation is not NO"
    sop_class = str(header.get("SOPClassUID", "") or "")
    if any(sop_class == p or sop_class.startswith(p + ".") for p in BURNED_IN_SOP_PREFIXES):
        kind = pydicom.uid.UID(sop_class).name if sop_class else sop_class
        return f"SOP class {kind} routinely carries burned-in text and BurnedInAnnotation is not NO"
    return None


def _pixels(image: DicomImage, *, window, multi_frame: str, burned_in: str, mask_border: int) -> None:
    header = image.header
    notes = image.notes
    if not any(k in header for k in _PIXEL_KEYWORDS):
        return _reject(image, "dicom_no_pixels", "the file has no Pixel Data (e.g. a report or an RT plan)")
    if "Rows" not in header or "Columns" not in header:
        return _reject(image, "dicom_unreadable", "Rows/Columns missing")
    syntax = header.file_meta.get("TransferSyntaxUID")
    if not syntax:
        return _reject(image, "dicom_unreadable", "the file meta has no Transfer Syntax UID")
    syntax_text = f"{syntax.name} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        kind = "dicom_compressed" if syntax.is_encapsulated else "dicom_unreadable"
        return _reject(image, kind, f"transfer syntax {syntax_text}: pydicom has no decoder for it; {_CONVERT_HINT}")
    if not decoder.is_available:
        return _reject(
            image, "dicom_compressed",
            f"transfer syntax {syntax_text}: no decoder for it is installed here (pydicom needs one of: "
            f"{'; '.join(decoder.missing_dependencies)}); {_CONVERT_HINT}",
        )  # fmt: skip

    why_burned = _burned_in_reason(header)
    if why_burned and burned_in == "quarantine":
        return _reject(image, "burned_in", f"{why_burned} (burned_in: quarantine)")

    frames = int(header.get("NumberOfFrames", 1) or 1)
    index = 0
    if frames > 1:
        if multi_frame == "quarantine":
            return _reject(image, "multi_frame", f"{frames} frames (multi_frame: quarantine)")
        index = frames // 2 if multi_frame == "middle" else 0
        notes.append(f"multi-frame: frame {index + 1} of {frames} used ({multi_frame})")

    try:
        arr, meta = decoder.as_array(header, index=index if frames > 1 else None)
    except Exception as exc:
        if syntax.is_encapsulated:
            return _reject(
                image, "dicom_compressed",
                f"transfer syntax {syntax_text}: the installed decoders failed on it ({type(exc).__name__}); "
                f"{_CONVERT_HINT}",
            )  # fmt: skip
        return _reject(image, "dicom_unreadable", f"the pixel data could not be decoded ({type(exc).__name__})")
    if frames > 1 and arr.ndim == (4 if int(meta.get("samples_per_pixel", 1)) > 1 else 3):
        arr = arr[0]

    photometric = str(meta.get("photometric_interpretation", header.get("PhotometricInterpretation", "")))
    grey = _to_unit(arr, header, photometric, window, notes)
    if grey is None:
        return _reject(image, "dicom_unreadable", "the decoded pixels are not a single 2-D image")
    pixels = np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)

    if why_burned:
        if burned_in == "mask":
            rows, cols = pixels.shape
            if 2 * mask_border >= min(rows, cols):
                return _reject(image, "burned_in", f"{why_burned}; a {mask_border}-px mask would cover the whole image")
            pixels[:mask_border, :] = 0
            pixels[-mask_border:, :] = 0
            pixels[:, :mask_border] = 0
            pixels[:, -mask_border:] = 0
            notes.append(f"burned-in annotation likely ({why_burned}): a {mask_border}-px border was blacked out")
        else:
            notes.append(f"burned-in annotation likely ({why_burned}): kept as is (burned_in: keep)")
    image.pixels = np.ascontiguousarray(pixels)


def _to_unit(arr: np.ndarray, header: Dataset, photometric: str, window, notes: list[str]) -> np.ndarray | None:
    """The decoded frame as float64 greyscale in [0, 1] (before rounding), or None if it is not an image."""
    if window is not None and (photometric == "PALETTE COLOR" or arr.ndim == 3):
        notes.append("the window parameter does not apply to colour images: not used")
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        rgb = apply_color_lut(arr, header).astype(np.float64)
        bits = int(header.RedPaletteColorLookupTableDescriptor[2])
        notes.append("PALETTE COLOR mapped to RGB, converted to greyscale (luma)")
        return (rgb @ _LUMA) / float(2**bits - 1)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if photometric.startswith("YBR"):  # still YCbCr after decoding: Y is the luma
            luma = arr[..., 0].astype(np.float64)
            notes.append(f"{photometric}: the Y (luma) channel used as greyscale")
        else:
            luma = arr[..., :3].astype(np.float64) @ _LUMA
            notes.append(f"{photometric or 'RGB'} converted to greyscale (luma)")
        bits = int(header.get("BitsStored", 8) or 8)
        return luma / float(2**bits - 1)
    if arr.ndim != 2:
        return None

    values = np.asarray(apply_modality_lut(arr, header), dtype=np.float64)
    if "ModalityLUTSequence" in header:
        notes.append("Modality LUT Sequence applied")
    elif "RescaleSlope" in header or "RescaleIntercept" in header:
        notes.append("Rescale Slope/Intercept applied")
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)

    unit = None
    if window is not None:
        center, width = (float(v) for v in window)
        unit = _window(values, center, width, "LINEAR")
        notes.append("window from the parameters (linear)")
    elif _has_voi_lut(header):
        lut = header.VOILUTSequence[0]
        data = np.asarray(lut.LUTData, dtype=np.float64).ravel()
        low, high = float(data.min()), float(data.max())
        if high > low:
            unit = (np.asarray(apply_voi(values, header, 0), dtype=np.float64) - low) / (high - low)
            notes.append("the file's first VOI LUT applied")
    if unit is None and window is None and "WindowCenter" in header and "WindowWidth" in header:
        center, width = _first(header.WindowCenter), _first(header.WindowWidth)
        function = _cs(header, "VOILUTFunction") or "LINEAR"
        if function == "LINEAR_EXACT" or function == "SIGMOID":
            usable = width > 0
        else:
            function, usable = "LINEAR", width >= 1
        if usable and np.isfinite(center) and np.isfinite(width):
            unit = _window(values, center, width, function)
            notes.append(f"the file's first window applied ({function.lower()})")
    if unit is None:
        low, high = float(values.min()), float(values.max())
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
        notes.append("no usable window: min-max scaling over the frame")
    if photometric == "MONOCHROME1":
        unit = 1.0 - np.clip(unit, 0.0, 1.0)
        notes.append("MONOCHROME1 inverted")
    return unit


def _has_voi_lut(header: Dataset) -> bool:
    seq = header.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _first(value) -> float:
    if isinstance(value, str | bytes | int | float):
        return float(value)
    return float(value[0])


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2/3 windowing onto [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
