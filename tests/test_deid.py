"""triage.deid: the secret key, pseudonyms, keyed UIDs and date shifts, and PS3.15 Annex E de-identification."""
import datetime as dt
import io
import json
import os
import re

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from triage import deid
from triage.deid import (
    KEY_ENV,
    KEY_FILE_ENV,
    PIPELINE_KEEP,
    date_offset_days,
    deidentify,
    keyed_uid,
    load_key,
    patient_of,
    profile_code,
    pseudonym,
)
from triage.errors import PipelineError

KEY = b"0123456789abcdef0123456789abcdef-test-key"
OTHER_KEY = b"fedcba9876543210fedcba9876543210-other-key"
UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")

STUDY_UID = "1.2.826.0.1.3680043.8.498.11111111111111111111"
SERIES_UID = "1.2.826.0.1.3680043.8.498.22222222222222222222"
FRAME_UID = "1.2.826.0.1.3680043.8.498.33333333333333333333"
REF_UID = "1.2.826.0.1.3680043.8.498.44444444444444444444"
# Values planted in the header that must not survive anywhere in the de-identified one.
PLANTED = ["DOE^JOHN", "MRN-4711", "HOSP-ISSUER", "ACC-987654", "St Elsewhere", "HOUSE^GREGORY", "19700101",
           "20200115", "20200316", "CT-ROOM-7", "SN-55501", "Private Secret", "12 Baker Street", "Knee pain study",
           "IODINE-DOE", "OTHER^PATIENT", "NESTED^NAME", STUDY_UID, SERIES_UID, FRAME_UID, REF_UID, "053Y"]


def sop(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.9{n:019d}"


def make_ds(n: int = 1, *, pixels=None, photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A CT-like dataset with identifying values planted, file meta Explicit VR Little Endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop(n)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop(n)
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.Modality = "CT"
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "MRN-4711"
    ds.IssuerOfPatientID = "HOSP-ISSUER"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.PatientAge = "053Y"
    ds.PatientAddress = "12 Baker Street"
    ds.AccessionNumber = "ACC-987654"
    ds.InstitutionName = "St Elsewhere"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.StationName = "CT-ROOM-7"
    ds.DeviceSerialNumber = "SN-55501"
    ds.StudyDescription = "Knee pain study"
    ds.ContrastBolusAgent = "IODINE-DOE"
    ds.StudyDate = "20200115"
    ds.StudyTime = "101500"
    ds.ContentDate = "20200115"
    ds.AcquisitionDateTime = "20200115101600.123456+0100"
    ds.add_new(0x00091010, "LO", "Private Secret")  # private element (odd group)
    other = Dataset()
    other.PatientName = "OTHER^PATIENT"
    other.PatientID = "MRN-4711"
    ds.OtherPatientIDsSequence = Sequence([other])
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = REF_UID
    ds.ReferencedImageSequence = Sequence([ref])
    if pixels is None:
        pixels = np.arange(16, dtype=np.uint16).reshape(4, 4)
    ds.set_pixel_data(pixels, photometric, 16 if pixels.dtype.itemsize == 2 else 8, generate_instance_uid=False)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def all_text(ds: Dataset) -> str:
    """Every value (recursively, file meta included) as text, for 'nothing planted survives' checks."""
    parts = []
    for elem in list(ds.file_meta.iterall() if getattr(ds, "file_meta", None) else []) + list(ds.iterall()):
        if elem.VR != "SQ" and elem.tag != 0x7FE00010:
            parts.append(str(elem.value))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- the key

def test_load_key_missing_says_how_to_create_one():
    with pytest.raises(PipelineError) as err:
        load_key({})
    msg = str(err.value)
    assert "secrets.token_hex(32)" in msg and "chmod 600" in msg and KEY_FILE_ENV in msg
    assert "params.yaml" in msg and "git" in msg


@pytest.mark.parametrize("environ, fragment", [
    ({KEY_ENV: "short-secret-value"}, "too short (18 characters"),
    ({KEY_ENV: "   "}, "unset or empty"),
    ({KEY_ENV: "x" * 40, KEY_FILE_ENV: "/nonexistent"}, "set only one"),
    ({KEY_FILE_ENV: "/nonexistent/triage_key"}, "does not exist"),
])
def test_load_key_refusals_never_print_the_key(environ, fragment):
    with pytest.raises(PipelineError) as err:
        load_key(environ)
    assert fragment in str(err.value)
    secret = environ.get(KEY_ENV, "").strip()
    assert not secret or secret not in str(err.value)


def test_load_key_from_env_and_from_private_file(tmp_path):
    secret = "a" * 20 + "b" * 20
    assert load_key({KEY_ENV: f"  {secret}\n"}) == secret.encode()
    path = tmp_path / "key"
    path.write_text(secret + "\n")
    os.chmod(path, 0o600)
    assert load_key({KEY_FILE_ENV: str(path)}) == secret.encode()


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_key_refuses_a_file_others_can_access(tmp_path, mode):
    path = tmp_path / "key"
    path.write_text("s" * 64)
    os.chmod(path, mode)
    with pytest.raises(PipelineError) as err:
        load_key({KEY_FILE_ENV: str(path)})
    assert f"chmod 600 {path}" in str(err.value) and f"{mode:04o}" in str(err.value)
    assert "s" * 64 not in str(err.value)


def test_load_key_reads_the_process_environment(monkeypatch):
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(KEY_ENV, "e" * 32)
    assert load_key() == b"e" * 32


# --------------------------------------------------------------------------- pseudonyms, UIDs, offsets

def test_pseudonym_is_keyed_deterministic_and_namespaced():
    p = pseudonym(KEY, "patient", "MRN-4711", "HOSP")
    assert p == pseudonym(KEY, "patient", "MRN-4711", "HOSP") and re.fullmatch(r"[0-9a-f]{16}", p)
    assert p != pseudonym(OTHER_KEY, "patient", "MRN-4711", "HOSP")  # changes with the key
    assert p != pseudonym(KEY, "study", "MRN-4711", "HOSP")  # kind is part of the input
    assert p != pseudonym(KEY, "patient", "MRN-4711H", "OSP")  # values are not just concatenated
    assert len(pseudonym(KEY, "patient", "x", length=32)) == 32
    with pytest.raises(ValueError):
        pseudonym(KEY, "patient", "x", length=0)


def test_keyed_uid_is_a_valid_consistent_new_uid():
    uids = [STUDY_UID, SERIES_UID, "1.2.3", "1.2.3\x00", ""]
    new = [keyed_uid(KEY, u) for u in uids]
    for original, uid in zip(uids, new):
        assert UID_RE.match(uid) and len(uid) <= 64 and uid != original
        assert pydicom.uid.UID(uid).is_valid
    assert new[2] == new[3]  # trailing NUL padding is not part of the UID
    assert len(set(new[:3])) == 3
    assert keyed_uid(KEY, STUDY_UID) == new[0] != keyed_uid(OTHER_KEY, STUDY_UID)


def test_date_offset_is_keyed_nonzero_and_bounded():
    offsets = [date_offset_days(KEY, pseudonym(KEY, "patient", str(i))) for i in range(300)]
    assert all(o != 0 and -365 <= o <= 365 for o in offsets)
    assert len(set(offsets)) > 100 and min(offsets) < 0 < max(offsets)
    assert all(1 <= abs(date_offset_days(KEY, str(i), max_days=3)) <= 3 for i in range(50))
    assert date_offset_days(KEY, "p") == date_offset_days(KEY, "p")
    with pytest.raises(ValueError):
        date_offset_days(KEY, "p", max_days=0)


def test_patient_of_uses_id_and_issuer_else_the_study():
    ds = make_ds()
    assert patient_of(ds, KEY) == pseudonym(KEY, "patient", "MRN-4711", "HOSP-ISSUER")
    ds.IssuerOfPatientID = "OTHER-HOSP"
    assert patient_of(ds, KEY) == pseudonym(KEY, "patient", "MRN-4711", "OTHER-HOSP")
    del ds.PatientID
    assert patient_of(ds, KEY) == pseudonym(KEY, "study", STUDY_UID)
    del ds.StudyInstanceUID
    assert patient_of(ds, KEY) == pseudonym(KEY, "unknown")


# ----------------------------------------------------------------------------------------- the table

@pytest.mark.parametrize("keyword, code", [
    ("PatientName", "Z"), ("PatientID", "Z/D"), ("PatientBirthDate", "Z"), ("PatientAge", "X"),
    ("StudyInstanceUID", "U"), ("SOPInstanceUID", "U"), ("InstitutionName", "X/Z/D"), ("AcquisitionDate", "X/Z"),
    ("SeriesDate", "X/D"), ("ReferencedImageSequence", "X/Z/U*"), ("ContentSequence", "D"),
    ("AccessionNumber", "Z"), ("IssuerOfPatientID", "X"), ("OtherPatientIDsSequence", "X"),
])
def test_profile_table_spot_checks(keyword, code):
    assert profile_code(tag_for_keyword(keyword)) == code


def test_profile_repeating_groups_and_unlisted():
    assert profile_code(0x60023000) == "X"  # Overlay Data, any 60xx group
    assert profile_code(0x50100010) == "X"  # Curve Data, any 50xx group
    assert profile_code(tag_for_keyword("KVP")) is None


def test_keep_and_clean_lists_are_outside_the_table():
    assert not [hex(t) for t in PIPELINE_KEEP if profile_code(t)]
    assert not [hex(t) for t in deid.CLEAN_TERMS if profile_code(t)]
    assert len(deid.PROFILE) > 600  # the whole Table E.1-1, not a hand-picked subset


# ---------------------------------------------------------------------------------- action codes

# (keyword, VR, planted value, table code, expected value; ABSENT = removed)
ABSENT = object()
ACTIONS = [
    # D: a dummy of the VR (a sequence: one empty item; a UI: a keyed UID)
    ("PersonName", "PN", "NESTED^NAME", "D", "ANONYMIZED"),
    ("ClinicalTrialSponsorName", "LO", "ACME Pharma", "D", "ANONYMIZED"),
    ("AnnotationGroupUID", "UI", "1.2.3.4.5", "D", keyed_uid(KEY, "1.2.3.4.5")),
    # Z: zero length
    ("AccessionNumber", "SH", "ACC-987654", "Z", ""),
    ("ReferringPhysicianName", "PN", "HOUSE^GREGORY", "Z", ""),
    ("PatientSex", "CS", "F", "Z", ""),
    ("StudyID", "SH", "S-99", "Z", ""),
    # X: removed
    ("PatientAge", "AS", "053Y", "X", ABSENT),
    ("PatientAddress", "LO", "12 Baker Street", "X", ABSENT),
    ("StudyDescription", "LO", "Knee pain study", "X", ABSENT),
    ("IssuerOfPatientID", "LO", "HOSP-ISSUER", "X", ABSENT),
    # U: keyed UID
    ("StudyInstanceUID", "UI", STUDY_UID, "U", keyed_uid(KEY, STUDY_UID)),
    ("SeriesInstanceUID", "UI", SERIES_UID, "U", keyed_uid(KEY, SERIES_UID)),
    ("FrameOfReferenceUID", "UI", FRAME_UID, "U", keyed_uid(KEY, FRAME_UID)),
    # compound codes -> the safe choice: Z/D -> Z; X/... -> X
    ("ContrastBolusAgent", "LO", "IODINE-DOE", "Z/D", ""),
    ("PatientSexNeutered", "CS", "ALTERED", "X/Z", ABSENT),
    ("RequestedProcedureDescription", "LO", "Knee pain study", "X/Z", ABSENT),
    ("ProtocolName", "LO", "DOE protocol", "X/D", ABSENT),
    ("DetectorID", "SH", "SN-55501", "X/D", ABSENT),
    ("InstitutionName", "LO", "St Elsewhere", "X/Z/D", ABSENT),
    ("StationName", "SH", "CT-ROOM-7", "X/Z/D", ABSENT),
    ("OperatorsName", "PN", "HOUSE^GREGORY", "X/Z/D", ABSENT),
    # K: the pipeline's keep-list, unchanged
    ("Modality", "CS", "CT", None, "CT"),
    ("RescaleSlope", "DS", "2", None, 2.0),
    ("WindowWidth", "DS", "400", None, 400.0),
    ("BurnedInAnnotation", "CS", "NO", None, "NO"),
    # C: defined terms kept, anything else removed
    ("ViewPosition", "CS", "PA", None, "PA"),
    ("ViewPosition", "CS", "DOE", None, ABSENT),
    ("BodyPartExamined", "CS", "chest", None, "CHEST"),
    ("BodyPartExamined", "CS", "KNEE DOE", None, ABSENT),
    # not in the table and not needed: removed (data minimisation)
    ("KVP", "DS", "120", None, ABSENT),
    ("Manufacturer", "LO", "St Elsewhere", None, ABSENT),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # planted lower-case CS
@pytest.mark.parametrize("keyword, vr, planted, code, expected", ACTIONS,
                         ids=[f"{a[3] or 'K/C/none'}-{a[0]}-{i}" for i, a in enumerate(ACTIONS)])
def test_action_code_outcome(keyword, vr, planted, code, expected):
    assert profile_code(tag_for_keyword(keyword)) == code
    ds = make_ds()
    ds.add_new(tag_for_keyword(keyword), vr, planted)
    out = deidentify(ds, KEY)
    if expected is ABSENT:
        assert keyword not in out
    else:
        assert keyword in out and out[keyword].value == expected


def test_d_on_a_sequence_is_one_empty_item():
    ds = make_ds()
    item = Dataset()
    item.CodeValue = "DOE"
    ds.PersonIdentificationCodeSequence = Sequence([item])
    out = deidentify(ds, KEY)
    assert profile_code(tag_for_keyword("PersonIdentificationCodeSequence")) == "D"
    assert len(out.PersonIdentificationCodeSequence) == 1 and len(out.PersonIdentificationCodeSequence[0]) == 0


def test_x_z_u_star_sequence_is_removed():
    out = deidentify(make_ds(), KEY)
    assert "ReferencedImageSequence" not in out


def test_patient_name_and_id_become_the_pseudonym():
    ds = make_ds()
    out = deidentify(ds, KEY)
    assert str(out.PatientName) == out.PatientID == patient_of(ds, KEY)
    assert deidentify(ds, OTHER_KEY).PatientID != out.PatientID


def test_private_tags_removed_everywhere():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert any(e.tag.is_private for e in ds.iterall())
    out = deidentify(ds, KEY)
    assert not [e.tag for e in out.iterall() if e.tag.is_private]
    assert "Pixel Data" in [e.name for e in out] and out.pixel_array.shape == (128, 128)


def test_nested_sequences_are_cleaned():
    ds = make_ds()
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]
    lut.LUTData = [0, 80, 160, 255]
    lut.PatientName = "NESTED^NAME"  # Z inside a kept sequence
    lut.ReferencedSOPInstanceUID = REF_UID  # U inside a kept sequence
    lut.ContentDate = "20200316"  # shifted inside a kept sequence
    lut.InstitutionName = "St Elsewhere"  # X/Z/D inside a kept sequence
    lut.add_new(0x00291010, "LO", "Private Secret")
    inner = Dataset()
    inner.PatientName = "NESTED^NAME"
    lut.OtherPatientIDsSequence = Sequence([inner])  # X inside a kept sequence
    ds.VOILUTSequence = Sequence([lut])
    for keyword in ("ReferencedPatientSequence", "RequestAttributesSequence"):
        item = Dataset()
        item.PatientName = "NESTED^NAME"
        setattr(ds, keyword, Sequence([item]))
    out = deidentify(ds, KEY)
    item = out.VOILUTSequence[0]
    assert item.LUTData == [0, 80, 160, 255] and item.LUTDescriptor == [4, 0, 8]
    assert item.PatientName == "" and item.ReferencedSOPInstanceUID == keyed_uid(KEY, REF_UID)
    offset = date_offset_days(KEY, patient_of(ds, KEY))
    assert item.ContentDate == (dt.date(2020, 3, 16) + dt.timedelta(days=offset)).strftime("%Y%m%d")
    assert "InstitutionName" not in item and "OtherPatientIDsSequence" not in item
    assert not [e for e in item if e.tag.is_private]
    assert "ReferencedPatientSequence" not in out and "RequestAttributesSequence" not in out
    assert "NESTED^NAME" not in all_text(out)


# ------------------------------------------------------------------------------------------ UIDs

def test_uids_consistent_across_files_of_one_study():
    a, b = deidentify(make_ds(1), KEY), deidentify(make_ds(2), KEY)
    assert a.StudyInstanceUID == b.StudyInstanceUID == keyed_uid(KEY, STUDY_UID)
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    for out, n in ((a, 1), (b, 2)):
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == keyed_uid(KEY, sop(n))
        assert out.SOPClassUID == out.file_meta.MediaStorageSOPClassUID == CTImageStorage  # K
        for uid in (out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID, out.FrameOfReferenceUID):
            assert UID_RE.match(uid) and len(uid) <= 64
            assert uid not in (STUDY_UID, SERIES_UID, sop(n), FRAME_UID)
    assert deidentify(make_ds(1), OTHER_KEY).StudyInstanceUID != a.StudyInstanceUID


# ----------------------------------------------------------------------------------------- dates

def shifted(date: str, offset: int) -> str:
    return (dt.datetime.strptime(date, "%Y%m%d") + dt.timedelta(days=offset)).strftime("%Y%m%d")


def test_dates_shift_by_one_offset_per_patient():
    first = make_ds(1, StudyDate="20200115", ContentDate="20200115")
    later = make_ds(2, StudyDate="20200316", ContentDate="20200316")
    a, b = deidentify(first, KEY), deidentify(later, KEY)
    offset = date_offset_days(KEY, patient_of(first, KEY))
    assert offset != 0
    assert a.StudyDate == shifted("20200115", offset) and b.StudyDate == shifted("20200316", offset)
    gap = dt.datetime.strptime(b.StudyDate, "%Y%m%d") - dt.datetime.strptime(a.StudyDate, "%Y%m%d")
    assert gap.days == 61  # the interval survives
    assert a.ContentDate == a.StudyDate  # Z/D date: shifted too
    assert a.AcquisitionDateTime == shifted("20200115", offset) + "101600.123456+0100"  # DT: date part
    assert a.StudyTime == "101500"  # a whole-day shift keeps the time of day
    assert a.PatientBirthDate == ""  # never shifted: emptied
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    other = make_ds(3, PatientID="MRN-0001")
    assert deidentify(other, KEY).StudyDate == shifted("20200115", date_offset_days(KEY, patient_of(other, KEY)))


def test_dates_removed():
    out = deidentify(make_ds(), KEY, dates="remove")
    for keyword in ("StudyDate", "ContentDate", "AcquisitionDateTime", "StudyTime", "PatientBirthDate"):
        assert out[keyword].value in ("", None), keyword
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert "dates removed" in out.DeidentificationMethod
    with pytest.raises(ValueError):
        deidentify(make_ds(), KEY, dates="keep")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the planted malformed dates
@pytest.mark.parametrize("keyword, value", [("StudyDate", "2020"), ("StudyDate", "2020-01-15"),
                                            ("AcquisitionDateTime", "202001"), ("StudyDate", "20201341")])
def test_unshiftable_dates_are_emptied_not_kept(keyword, value):
    out = deidentify(make_ds(**{keyword: value}), KEY)
    assert out[keyword].value in ("", None)


def test_plain_x_dates_removed_even_when_shifting():
    assert profile_code(tag_for_keyword("AdmittingDate")) == "X"
    out = deidentify(make_ds(AdmittingDate="20200110"), KEY)
    assert "AdmittingDate" not in out


# --------------------------------------------------------------------------------- the whole result

def test_identity_removed_markers():
    out = deidentify(make_ds(), KEY)
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == "triage Basic Profile; keyed UIDs; dates shifted"
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113107", "DCM")]


@pytest.mark.parametrize("dates", ["shift", "remove"])
def test_no_planted_value_survives(dates):
    ds = make_ds()
    out = deidentify(ds, KEY, dates=dates)
    text = all_text(out)
    assert [v for v in PLANTED if v in text] == []
    assert out.preamble == b"\x00" * 128 and not hasattr(out, "filename")


def test_input_untouched_and_output_writable():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    before = ds.to_json_dict()
    out = deidentify(ds, KEY)
    assert ds.to_json_dict() == before and out is not ds
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert back.SOPInstanceUID == out.SOPInstanceUID and back.PatientIdentityRemoved == "YES"
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    json.dumps(out.to_json_dict(bulk_data_threshold=64))  # exportable as DICOM JSON (no ambiguous VRs)
    assert deidentify(ds, KEY).to_json_dict() == out.to_json_dict()  # deterministic
