"""De-identification of DICOM headers (PS3.15 Annex E), pseudonyms and the secret key they derive from.

One concept: turn a DICOM dataset that identifies a patient into one that does not, reproducibly.

* The Annex E table (Table E.1-1, "Basic Prof." column, DICOM edition 2026c) comes from the pinned package
  ``dicom-anonymizer==2.1.0`` (module ``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c``), which
  ships the standard's attribute lists per action code; only the *table* is used, never its anonymiser. Our
  actions are ours: keyed UIDs, a keyed per-patient date shift and keyed pseudonyms.
* Compound codes resolve to the safe choice: every code that offers X (X/Z, X/D, X/Z/D, X/Z/U*) removes the
  attribute, Z/D empties it. Removal and empty values carry no information; the de-identified header is our
  own record, not an object sent back to a PACS, so IOD type 1/2 conformance does not force a dummy.
* Data minimisation (stricter than the profile, which would retain unlisted public attributes): an attribute
  the table does not list is removed unless it is in ``PIPELINE_KEEP`` (K: kept; sequences cleaned item by
  item) or ``CLEAN_TERMS`` (C: kept only when it is one of a short list of the standard's defined terms).
  All private attributes are removed, as are group-length, command (0000) and file-meta (0002) elements
  found inside a dataset, and the file's preamble.
* Dates: ``dates="shift"`` moves every DA/DT value the table lists with an action other than plain X by the
  patient's keyed offset (whole days, so intervals and TM values are preserved; the Retain Longitudinal
  Temporal Information with Modified Dates option); ``dates="remove"`` empties them (and their TM). Plain-X
  dates are removed and Patient's Birth Date is always emptied (Z) in both modes.
* Patient's Name and Patient ID (top level) become the patient pseudonym ``patient_of``; nested copies get
  their profile code (Z).

The key never leaves this module in any message.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _annex_e
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from triage.errors import PipelineError

KEY_ENV = "TRIAGE_DEID_KEY"
KEY_FILE_ENV = "TRIAGE_DEID_KEY_FILE"
MIN_KEY_CHARS = 32
DATE_MODES = ("shift", "remove")

# The standard's edition the action table was taken from (dicom-anonymizer 2.1.0, dicomfields_2026c).
ANNEX_E_EDITION = "DICOM PS3.15 2026c, Table E.1-1, Basic Profile column"

_KEY_HOWTO = (
    "Create one once, outside the repository, and point the pipeline at it:\n"
    '  python -c "import secrets; print(secrets.token_hex(32))" > ~/.triage_deid_key'
    " && chmod 600 ~/.triage_deid_key && export TRIAGE_DEID_KEY_FILE=~/.triage_deid_key\n"
    f"(or export {KEY_ENV}=<that secret>). The pseudonyms, keyed UIDs and date shifts are derived from it: keep it "
    "secret and keep it (a new key gives every patient a new pseudonym). Never put it in params.yaml, dvc.yaml, "
    "a notebook or git."
)


# --------------------------------------------------------------------------------------------------- the key


def load_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The de-identification secret from $TRIAGE_DEID_KEY or the file named by $TRIAGE_DEID_KEY_FILE.

    Refused (PipelineError, with how to create one): neither set, both set, a missing or non-regular file, a
    file that group or others may read or write (anything beyond mode 0600), and a secret shorter than 32
    characters (surrounding whitespace stripped). The secret itself is never part of a message.
    """
    env = os.environ if environ is None else environ
    value = (env.get(KEY_ENV) or "").strip()
    path_text = (env.get(KEY_FILE_ENV) or "").strip()
    if value and path_text:
        raise PipelineError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one of them. {_KEY_HOWTO}")
    if path_text:
        path = Path(path_text).expanduser()
        try:
            st = path.stat()
        except OSError:
            raise PipelineError(
                f"{KEY_FILE_ENV} names {path}, which does not exist or cannot be read. {_KEY_HOWTO}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise PipelineError(f"{KEY_FILE_ENV} names {path}, which is not a regular file. {_KEY_HOWTO}")
        if os.name == "posix" and st.st_mode & 0o077:
            raise PipelineError(
                f"the de-identification key file {path} is readable or writable by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); restrict it with: chmod 600 {path}"
            )
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise PipelineError(f"cannot read the key file {path} as UTF-8 text. {_KEY_HOWTO}") from None
        source = f"the file {path} (${KEY_FILE_ENV})"
    elif value:
        secret, source = value, f"${KEY_ENV}"
    else:
        raise PipelineError(f"no de-identification key: {KEY_FILE_ENV} and {KEY_ENV} are unset or empty. {_KEY_HOWTO}")
    if len(secret) < MIN_KEY_CHARS:
        raise PipelineError(
            f"the de-identification key in {source} is too short ({len(secret)} characters; at least "
            f"{MIN_KEY_CHARS} are required). {_KEY_HOWTO}"
        )
    return secret.encode("utf-8")


def _mac(key: bytes, *parts: str) -> bytes:
    """HMAC-SHA256 over an unambiguous encoding of `parts` (a JSON list: no two part lists collide)."""
    if not isinstance(key, bytes | bytearray) or not key:
        raise TypeError("the de-identification key must be non-empty bytes (use load_key())")
    message = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hmac.new(bytes(key), message, hashlib.sha256).digest()


def pseudonym(key: bytes, kind: str, *values: str, length: int = 16) -> str:
    """Keyed, deterministic pseudonym of `values` in the namespace `kind`: HMAC-SHA256 hex, `length` chars."""
    if not 1 <= length <= 64:
        raise ValueError(f"pseudonym length must be 1..64 hex characters, got {length}")
    return _mac(key, "pseudonym", kind, *(str(v) for v in values)).hex()[:length]


def keyed_uid(key: bytes, uid: str) -> str:
    """A valid DICOM UID replacing `uid`: ``2.25.<int>`` of a keyed 128-bit value (UUID version-8 layout).

    Same key and UID -> same result (so references between files of one study stay consistent); at most
    44 characters, digits and dots only, no leading zeros.
    """
    raw = bytearray(_mac(key, "uid", str(uid).strip("\x00 "))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return "2.25." + str(int.from_bytes(raw, "big"))


def date_offset_days(key: bytes, patient_pseudonym: str, max_days: int = 365) -> int:
    """The patient's keyed date shift: a nonzero whole number of days in [-max_days, max_days]."""
    if max_days < 1:
        raise ValueError(f"max_days must be >= 1, got {max_days}")
    n = int.from_bytes(_mac(key, "date-offset", patient_pseudonym)[:8], "big")
    magnitude = 1 + (n >> 1) % max_days
    return magnitude if n & 1 else -magnitude


def patient_of(ds: Dataset, key: bytes) -> str:
    """The patient pseudonym: ``pseudonym(key, "patient", PatientID, IssuerOfPatientID)``.

    A file without Patient ID gets ``pseudonym(key, "study", StudyInstanceUID)`` (its study stands in for the
    patient); one with neither gets ``pseudonym(key, "unknown")``, so all such files form one "patient" and
    cannot leak across a patient split.
    """
    patient_id = _text(ds, "PatientID")
    if patient_id:
        return pseudonym(key, "patient", patient_id, _text(ds, "IssuerOfPatientID"))
    study = _text(ds, "StudyInstanceUID")
    if study:
        return pseudonym(key, "study", study)
    return pseudonym(key, "unknown")


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value counts as absent
        return ""
    return "" if value is None else str(value).strip("\x00 ")


# --------------------------------------------------------------------------------------------- the table

_CATEGORY_CODES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# Compound codes -> the action taken (see the module docstring).
RESOLVE = {"D": "D", "Z": "Z", "X": "X", "U": "U", "Z/D": "Z", "X/Z": "X", "X/D": "X", "X/Z/D": "X", "X/Z/U*": "X"}


def _load_profile() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for category, code in _CATEGORY_CODES.items():
        for entry in getattr(_annex_e, category):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = code
            else:  # a repeating group, e.g. (0x6000, 0x3000, 0xFF00, 0xFFFF): Overlay Data in any 60xx group
                group, element, group_mask, element_mask = entry
                masked.append(((group << 16) | element, (group_mask << 16) | element_mask, code))
    return exact, tuple(masked)


# tag -> Basic Profile action code, as the standard writes it (compound codes included).
PROFILE, _PROFILE_MASKED = _load_profile()


def profile_code(tag: int) -> str | None:
    """The Basic Profile action code the table gives `tag` ('D', 'X/Z/D', ...), or None if it is not listed."""
    tag = int(tag)
    code = PROFILE.get(tag)
    if code is None:
        for value, mask, masked_code in _PROFILE_MASKED:
            if tag & mask == value:
                return masked_code
    return code


def _tags(*keywords: str) -> frozenset[int]:
    tags = {tag_for_keyword(k) for k in keywords}
    if None in tags:
        raise RuntimeError(f"unknown DICOM keyword among {keywords}")
    return frozenset(tags)  # type: ignore[arg-type]


# K: what the pipeline needs beyond the profile, kept unchanged (sequences: cleaned item by item). None of
# these is listed in Table E.1-1 (tests/test_deid.py checks). The transfer syntax travels in the file meta.
PIPELINE_KEEP: frozenset[int] = _tags(
    # what the image is
    "SOPClassUID", "Modality", "ImageType", "BurnedInAnnotation",
    # how to decode the pixels
    "PhotometricInterpretation", "SamplesPerPixel", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
    # geometry
    "PixelSpacing", "ImagerPixelSpacing",
    # Modality LUT and VOI LUT modules
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "ModalityLUTType", "LUTDescriptor",
    "LUTData", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)  # fmt: skip

# C: not in Table E.1-1, useful to the pipeline, and kept only when the value is one of these defined terms
# (PS3.3 C.8.11.5 View Position; PS3.16 Annex L Body Part Examined, a radiography subset) -- a value of
# similar meaning known not to identify anyone. Anything else is removed.
CLEAN_TERMS: dict[int, frozenset[str]] = {
    tag_for_keyword("ViewPosition"): frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"}),
    tag_for_keyword("BodyPartExamined"): frozenset(
        {
            "ABDOMEN", "ANKLE", "ARM", "BREAST", "CHEST", "CLAVICLE", "COCCYX", "CSPINE", "ELBOW", "EXTREMITY",
            "FOOT", "FOREARM", "HAND", "HEAD", "HEART", "HIP", "JAW", "KNEE", "LEG", "LSPINE", "NECK", "PELVIS",
            "RIB", "SHOULDER", "SKULL", "SPINE", "SSPINE", "TSPINE", "THORAX", "WRIST", "WHOLEBODY", "BRAIN",
        }
    ),  # fmt: skip
}

_PATIENT_NAME = tag_for_keyword("PatientName")
_PATIENT_ID = tag_for_keyword("PatientID")
_BIRTH_DATE = tag_for_keyword("PatientBirthDate")
_TEMPORAL_VRS = ("DA", "DT", "TM")

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {
    "AE": _DUMMY_TEXT, "AS": "000Y", "CS": _DUMMY_TEXT, "DA": "19000101", "DS": "0", "DT": "19000101000000",
    "IS": "0", "LO": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "PN": _DUMMY_TEXT, "SH": _DUMMY_TEXT, "ST": _DUMMY_TEXT,
    "TM": "000000", "UC": _DUMMY_TEXT, "UR": _DUMMY_TEXT, "UT": _DUMMY_TEXT, "AT": 0, "FL": 0.0, "FD": 0.0,
    "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0, "OB": b"\x00\x00", "OW": b"\x00\x00",
    "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4, "OV": b"\x00" * 8, "UN": b"\x00\x00",
}  # fmt: skip

# CID 7050 De-identification Method codes (DCM)
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")


# --------------------------------------------------------------------------------------------- de-identify


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and its logger: their messages quote header values (names, IDs, dates)."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled = pydicom_logger.disabled
    pydicom_logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled = was_disabled


class _Context:
    def __init__(self, key: bytes, dates: str, offset_days: int):
        self.key, self.dates, self.offset = key, dates, _dt.timedelta(days=offset_days)


def deidentify(ds: Dataset, key: bytes, *, dates: str = "shift") -> Dataset:
    """A new, de-identified copy of `ds` (Basic Application Level Confidentiality Profile, see the module doc).

    `ds` is not modified. The result has a fresh file meta (keyed MediaStorageSOPInstanceUID, the original
    transfer syntax), a zeroed preamble, PatientName = PatientID = ``patient_of(ds, key)``,
    PatientIdentityRemoved YES, DeidentificationMethod and DeidentificationMethodCodeSequence (113100, plus
    113107 when dates are shifted) and LongitudinalTemporalInformationModified MODIFIED/REMOVED.
    """
    if dates not in DATE_MODES:
        raise ValueError(f"dates must be one of {DATE_MODES}, got {dates!r}")
    with quiet_pydicom():
        patient = patient_of(ds, key)
        ctx = _Context(key, dates, date_offset_days(key, patient) if dates == "shift" else 0)
        out = _clean(ds, ctx, top=True)
        out.PatientName = patient
        out.PatientID = patient
        out.PatientIdentityRemoved = "YES"
        method = "triage Basic Profile; keyed UIDs; " + ("dates shifted" if dates == "shift" else "dates removed")
        out.DeidentificationMethod = method
        codes = [BASIC_PROFILE_CODE] + ([MODIFIED_DATES_CODE] if dates == "shift" else [])
        out.DeidentificationMethodCodeSequence = Sequence([_code_item(value, meaning) for value, meaning in codes])
        out.LongitudinalTemporalInformationModified = "MODIFIED" if dates == "shift" else "REMOVED"
        out.file_meta = _file_meta(ds, out, key)
        out.preamble = b"\x00" * 128
        try:  # resolve 'US or SS' / 'OB or OW' so the header can be written or exported as JSON
            correct_ambiguous_vr(out, is_little_endian=True)
        except Exception:
            pass
    return out


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _file_meta(src: Dataset, out: Dataset, key: bytes) -> FileMetaDataset:
    old = getattr(src, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    sop_class = old.get("MediaStorageSOPClassUID") or out.get("SOPClassUID")
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    sop_instance = old.get("MediaStorageSOPInstanceUID") or src.get("SOPInstanceUID")
    if sop_instance:
        meta.MediaStorageSOPInstanceUID = keyed_uid(key, str(sop_instance))
    if old.get("TransferSyntaxUID"):
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _clean(src: Dataset, ctx: _Context, *, top: bool) -> Dataset:
    out = Dataset()
    for tag in list(src.keys()):
        if tag.is_private or tag.element == 0 or tag.group in (0x0000, 0x0002, 0xFFFE):
            continue
        if top and tag in (_PATIENT_NAME, _PATIENT_ID):
            continue  # replaced by the pseudonym in deidentify()
        if tag in PIPELINE_KEEP:
            elem = src[tag]
            out.add(_keep(elem, ctx))
            continue
        code = profile_code(tag)
        if tag in CLEAN_TERMS:
            elem = _clean_term(src, tag)
        elif code is None or code == "X":
            continue  # not needed (minimisation) or removed by the profile: no need to read the value
        else:
            try:
                elem = _apply(src[tag], code, ctx)
            except Exception:  # a value pydicom cannot parse: removing it is always safe
                elem = None
        if elem is not None:
            out.add(elem)
    return out


def _keep(elem: DataElement, ctx: _Context) -> DataElement:
    """K: unchanged for non-sequence attributes; for sequences every item is cleaned by the same rules."""
    if elem.VR == "SQ":
        return DataElement(elem.tag, "SQ", Sequence([_clean(item, ctx, top=False) for item in elem.value or []]))
    return copy.deepcopy(elem)


def _clean_term(src: Dataset, tag: int) -> DataElement | None:
    try:
        value = str(src[tag].value or "").strip().upper()
    except Exception:
        return None
    return DataElement(tag, "CS", value) if value in CLEAN_TERMS[tag] else None


def _base_vr(elem: DataElement) -> str:
    vr = elem.VR or dictionary_VR(elem.tag)
    return vr.split(" or ")[0]  # 'US or SS' -> 'US', 'OB or OW' -> 'OB'


def _apply(elem: DataElement, code: str, ctx: _Context) -> DataElement | None:
    vr = _base_vr(elem)
    if vr in _TEMPORAL_VRS and elem.tag != _BIRTH_DATE:
        return DataElement(elem.tag, vr, _temporal(elem.value, vr, ctx))
    action = RESOLVE[code]
    if action == "X":
        return None
    if action == "U" or (action == "D" and vr == "UI"):
        return DataElement(elem.tag, "UI", _map_values(elem.value, lambda uid: keyed_uid(ctx.key, uid)) or
                           keyed_uid(ctx.key, ""))
    if action == "Z":
        return DataElement(elem.tag, vr, empty_value_for_VR(vr))
    # D: a non-zero-length dummy consistent with the VR (a sequence: one empty item)
    if vr == "SQ":
        return DataElement(elem.tag, "SQ", Sequence([Dataset()]))
    return DataElement(elem.tag, vr, _DUMMY.get(vr, _DUMMY_TEXT))


def _map_values(value, fn):
    """Apply `fn` to each value of a (possibly multi-valued) string element; None for an empty one."""
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        return fn(value.decode("ascii", "replace") if isinstance(value, bytes) else str(value))
    values = [fn(str(v)) for v in value if str(v).strip("\x00 ")]
    return values or None


def _temporal(value, vr: str, ctx: _Context):
    """A date/datetime/time the table keeps (any code but X): shifted by the patient's offset, or emptied."""
    if ctx.dates == "remove":
        return empty_value_for_VR(vr)
    if vr == "TM":  # a whole-day shift leaves the time of day as it is
        return value
    shift = _shift_da if vr == "DA" else _shift_dt
    values = [value] if isinstance(value, str | bytes) or value is None else list(value)
    shifted = [shift(str(v), ctx.offset) for v in values if v is not None and str(v).strip()]
    if not shifted or None in shifted:  # unparseable or partial: keep nothing rather than leak the original
        return empty_value_for_VR(vr)
    return shifted[0] if len(shifted) == 1 else shifted


def _shift_da(value: str, offset: _dt.timedelta) -> str | None:
    text = value.strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return (_dt.date(int(text[:4]), int(text[4:6]), int(text[6:])) + offset).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return None


def _shift_dt(value: str, offset: _dt.timedelta) -> str | None:
    match = re.fullmatch(r"(\d{8})([0-9.]*)([+-]\d{4})?", value.strip())
    if not match:  # includes year- or month-only precision, which a day shift cannot keep
        return None
    date = _shift_da(match.group(1), offset)
    return None if date is None else date + match.group(2) + (match.group(3) or "")
