"""triage.dicom: DICOM pixels -> uint8 greyscale (LUTs, windows, colour, frames), burned-in rules, quarantine."""
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from triage.deid import deidentify, patient_of
from triage.dicom import DICOM_PREAMBLE_OFFSET, DicomImage, is_dicom_bytes, is_dicom_file, read_dicom
from triage.errors import ParamsError

KEY = b"0123456789abcdef0123456789abcdef-test-key"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
PLANTED = ["DOE^JOHN", "DOE", "JOHN", "MRN-4711", "ACC-987654", "St Elsewhere", "19700101", "20200115",
           "Private Secret", "1.2.826.0.1.3680043.8.498.1111"]
# a directory and file name that identify the patient: they must not show up in detail/notes either
IDENTIFYING_NAME = "DOE_JOHN_MRN-4711"


def make_ds(pixels, photometric="MONOCHROME2", *, sop_class=CTImageStorage, modality="CT", bits=None, **attrs):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1111.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1111.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1111.3"
    ds.Modality = modality
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "MRN-4711"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-987654"
    ds.InstitutionName = "St Elsewhere"
    ds.StudyDate = "20200115"
    ds.add_new(0x00091010, "LO", "Private Secret")
    pixels = np.asarray(pixels)
    ds.set_pixel_data(pixels, photometric, bits or 8 * pixels.dtype.itemsize, generate_instance_uid=False)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def write(tmp_path, ds, name=None):
    folder = tmp_path / IDENTIFYING_NAME
    folder.mkdir(exist_ok=True)
    path = folder / (name or f"{IDENTIFYING_NAME}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(dtype=np.uint16):
    return np.array([[0, 50], [100, 150]], dtype=dtype)


def assert_clean(img: DicomImage):
    texts = [img.detail or ""] + list(img.notes)
    assert [v for v in PLANTED + [IDENTIFYING_NAME] if any(v in t for t in texts)] == []


# ------------------------------------------------------------------------------------- recognising

@pytest.mark.parametrize("head, expected", [
    (b"\x00" * 128 + b"DICM" + b"\x02\x00", True),
    (b"\x00" * 128 + b"DICM", True),
    (b"\x00" * 128 + b"DICX", False),
    (b"DICM" + b"\x00" * 128, False),
    (b"\x89PNG\r\n\x1a\n", False),
    (b"", False),
])
def test_is_dicom_bytes(head, expected):
    assert DICOM_PREAMBLE_OFFSET == 128 and is_dicom_bytes(head) is expected


def test_is_dicom_file(tmp_path):
    assert is_dicom_file(get_testdata_file("CT_small.dcm"))
    (tmp_path / "x.png").write_bytes(b"\x89PNG" + b"\x00" * 200)
    assert not is_dicom_file(tmp_path / "x.png") and not is_dicom_file(tmp_path / "missing.dcm")


# -------------------------------------------------------------------------------------- real files

@pytest.mark.parametrize("name, shape", [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64)),
                                         ("MR_small_RLE.dcm", (64, 64)), ("MR_small_bigendian.dcm", (64, 64))])
def test_reads_real_files_into_uint8_with_a_deidentified_header(name, shape):
    path = get_testdata_file(name)
    img = read_dicom(path, KEY)
    assert img.ok and img.reason is None and img.detail is None
    assert img.pixels.shape == shape and img.pixels.dtype == np.uint8 and img.pixels.flags.c_contiguous
    original = pydicom.dcmread(path)
    assert img.patient == patient_of(original, KEY) == str(img.header.PatientName)
    assert img.header.PatientIdentityRemoved == "YES"
    assert img.header.SOPInstanceUID != original.SOPInstanceUID
    assert not [e for e in img.header.iterall() if e.tag.is_private]
    again = read_dicom(path, KEY)
    assert again.pixels.tobytes() == img.pixels.tobytes()  # deterministic bytes


def test_same_pixels_whatever_the_transfer_syntax():
    ref = read_dicom(get_testdata_file("MR_small.dcm"), KEY).pixels
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(read_dicom(get_testdata_file(name), KEY).pixels, ref), name


# ------------------------------------------------------------------------------------ pixel pipeline

def test_modality_lut_and_window_from_params(tmp_path):
    # stored 0,50,100,150 -> slope 2, intercept -100 -> -100, 0, 100, 200
    ds = make_ds(ramp(), RescaleSlope="2", RescaleIntercept="-100", WindowCenter="9999", WindowWidth="2")
    img = read_dicom(write(tmp_path, ds), KEY, window=(50, 201))
    # linear window (PS3.3 C.11.2.1.2): ((x - 49.5) / 200 + 0.5) clipped to [0, 1], x255, rounded
    expected = np.rint(np.clip((np.array([[-100, 0], [100, 200]]) - 49.5) / 200 + 0.5, 0, 1) * 255)
    assert img.pixels.tolist() == expected.astype(np.uint8).tolist() == [[0, 64], [192, 255]]
    assert "window from the parameters (linear)" in img.notes and "Rescale Slope/Intercept applied" in img.notes


def test_window_from_the_file_then_min_max(tmp_path):
    windowed = make_ds(ramp(), WindowCenter=["75", "0"], WindowWidth=["101", "1"])
    img = read_dicom(write(tmp_path, windowed, "a.dcm"), KEY)
    expected = np.rint(np.clip((np.array([[0, 50], [100, 150]]) - 74.5) / 100 + 0.5, 0, 1) * 255)
    assert img.pixels.tolist() == expected.astype(int).tolist()
    assert "the file's first window applied (linear)" in img.notes
    plain = read_dicom(write(tmp_path, make_ds(ramp()), "b.dcm"), KEY)
    assert plain.pixels.tolist() == [[0, 85], [170, 255]]
    assert "no usable window: min-max scaling over the frame" in plain.notes


def test_voi_lut_sequence(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries, first mapped value 0, 8 bits
    lut.add_new(0x00283006, "US", [0, 10, 20, 40])  # LUT Data
    ds = make_ds(np.array([[0, 1], [2, 3]], dtype=np.uint16), VOILUTSequence=Sequence([lut]))
    img = read_dicom(write(tmp_path, ds), KEY)
    assert img.pixels.tolist() == [[0, 64], [128, 255]]  # scaled by the LUT's own output range 0..40
    assert "the file's first VOI LUT applied" in img.notes


def test_monochrome1_inverted(tmp_path):
    mono2 = read_dicom(write(tmp_path, make_ds(ramp()), "a.dcm"), KEY).pixels
    img = read_dicom(write(tmp_path, make_ds(ramp(), "MONOCHROME1"), "b.dcm"), KEY)
    assert img.pixels.tolist() == (255 - mono2).tolist() == [[255, 170], [85, 0]]
    assert "MONOCHROME1 inverted" in img.notes


def test_unused_high_bits_are_ignored(tmp_path):
    # 12 bits stored in 16: bits 12-15 (e.g. a retired embedded overlay with text) must not reach the image
    ds = make_ds(ramp(), bits=12)
    ds.PixelData = (ramp() | np.uint16(0xF000)).tobytes()
    img = read_dicom(write(tmp_path, ds), KEY)
    assert img.pixels.tolist() == [[0, 85], [170, 255]]


def test_rgb_becomes_luma(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (255, 255, 255)
    ds = make_ds(rgb, "RGB", BurnedInAnnotation="NO")
    img = read_dicom(write(tmp_path, ds), KEY)
    assert img.pixels.tolist() == [[76, 150], [29, 255]]
    assert any("greyscale (luma)" in n for n in img.notes)


def test_real_colour_files():
    for name in ("SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", "examples_palette.dcm"):
        img = read_dicom(get_testdata_file(name), KEY, burned_in="keep")
        assert img.ok and img.pixels.ndim == 2 and img.pixels.dtype == np.uint8, name


# ------------------------------------------------------------------------------------- multi-frame

@pytest.mark.parametrize("rule, value, reason", [("middle", 20, None), ("first", 10, None),
                                                 ("quarantine", None, "multi_frame")])
def test_multi_frame_rule(tmp_path, rule, value, reason):
    frames = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (10, 20, 30)])
    ds = make_ds(frames, RescaleSlope="1", RescaleIntercept="0")
    img = read_dicom(write(tmp_path, ds), KEY, multi_frame=rule, window=(20, 11))
    assert img.reason == reason
    if reason:
        assert img.pixels is None and "3 frames" in img.detail
    else:
        expected = int(np.rint(np.clip((value - 19.5) / 10 + 0.5, 0, 1) * 255))
        assert img.pixels.shape == (4, 4) and set(img.pixels.ravel().tolist()) == {expected}
        assert any(f"of 3 used ({rule})" in n for n in img.notes)
    assert_clean(img)


# ---------------------------------------------------------------------------------------- burned-in

# (modality, SOP class, BurnedInAnnotation or None, expected reason with burned_in="quarantine")
BURNED_IN = [
    ("CT", CTImageStorage, None, None),
    ("CT", CTImageStorage, "YES", "burned_in"),
    ("DX", DX_IMAGE, "NO", None),
    ("US", US_IMAGE, None, "burned_in"),  # US: burned in by default
    ("US", US_IMAGE, "NO", None),  # ... unless the file says NO
    ("OT", SecondaryCaptureImageStorage, None, "burned_in"),
    ("CT", SecondaryCaptureImageStorage, None, "burned_in"),  # SC SOP class, whatever the modality
    ("XC", VL_PHOTO, None, "burned_in"),
    ("OT", SecondaryCaptureImageStorage, "NO", None),
    ("SEG", SEGMENTATION, None, None),  # 1.1.66.4 is not "1.1.6*" ultrasound
]


@pytest.mark.parametrize("modality, sop_class, flag, reason", BURNED_IN)
def test_burned_in_rule(tmp_path, modality, sop_class, flag, reason):
    attrs = {} if flag is None else {"BurnedInAnnotation": flag}
    ds = make_ds(np.full((8, 8), 200, dtype=np.uint8), sop_class=sop_class, modality=modality, **attrs)
    img = read_dicom(write(tmp_path, ds), KEY)
    assert img.reason == reason
    if reason:
        assert img.pixels is None and "burned_in: quarantine" in img.detail
        assert img.header is not None and img.patient  # quarantined files are still de-identified
    else:
        assert img.pixels.shape == (8, 8)
    assert_clean(img)


def test_burned_in_mask_and_keep(tmp_path):
    pixels = np.arange(100, dtype=np.uint8).reshape(10, 10) + 100
    path = write(tmp_path, make_ds(pixels, sop_class=US_IMAGE, modality="US", RescaleSlope="1",
                                   RescaleIntercept="0"))
    masked = read_dicom(path, KEY, burned_in="mask", mask_border=2, window=(128, 256))
    kept = read_dicom(path, KEY, burned_in="keep", window=(128, 256))
    assert masked.ok and kept.ok
    assert kept.pixels.tolist() == pixels.tolist()  # this window is the identity on 0..255
    border = np.ones((10, 10), dtype=bool)
    border[2:-2, 2:-2] = False
    assert (masked.pixels[border] == 0).all() and (masked.pixels[~border] == pixels[~border]).all()
    assert any("2-px border was blacked out" in n for n in masked.notes)
    assert any("kept as is (burned_in: keep)" in n for n in kept.notes)
    whole = read_dicom(path, KEY, burned_in="mask", mask_border=5)
    assert whole.reason == "burned_in" and "cover the whole image" in whole.detail
    for img in (masked, kept, whole):
        assert_clean(img)


# ------------------------------------------------------------------------------------------ quarantine

@pytest.mark.parametrize("name, syntax", [("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless"),
                                          ("JPEG-lossy.dcm", "JPEG Extended"),
                                          ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless")])
def test_compressed_we_cannot_decode(tmp_path, name, syntax):
    # plant identifiers into a copy of the compressed file (the header is rewritten, the pixels stay encoded)
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientName, ds.PatientID, ds.InstitutionName = "DOE^JOHN", "MRN-4711", "St Elsewhere"
    ds.BurnedInAnnotation = "NO"
    path = tmp_path / f"{IDENTIFYING_NAME}.dcm"
    ds.save_as(path)
    img = read_dicom(path, KEY)
    assert img.reason == "dicom_compressed" and img.pixels is None
    assert syntax in img.detail and str(ds.file_meta.TransferSyntaxUID) in img.detail
    assert img.header is not None and img.header.PatientID == img.patient
    assert_clean(img)


def test_unreadable_files_never_raise(tmp_path):
    good = write(tmp_path, make_ds(np.full((64, 64), 7, dtype=np.uint16)))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-3000])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    not_dicom = tmp_path / f"{IDENTIFYING_NAME}.png"
    not_dicom.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "mr_truncated.dcm")
    cases = [(truncated, "dicom_unreadable"), (garbage, "dicom_no_pixels"), (not_dicom, "dicom_unreadable"),
             (tmp_path / "mr_truncated.dcm", "dicom_unreadable"), (tmp_path / "missing.dcm", "dicom_unreadable")]
    for path, reason in cases:
        img = read_dicom(path, KEY)
        assert img.reason == reason and img.pixels is None and img.detail, path.name
        assert_clean(img)


def test_no_pixels():
    img = read_dicom(get_testdata_file("rtplan.dcm"), KEY)
    assert img.reason == "dicom_no_pixels" and img.header is not None and img.pixels is None


def test_header_is_never_the_original(tmp_path):
    ds = make_ds(ramp())
    img = read_dicom(write(tmp_path, ds), KEY, dates="remove")
    expected = deidentify(ds, KEY, dates="remove")
    assert img.header.to_json_dict() == expected.to_json_dict()
    assert img.header.StudyDate == "" and "PatientBirthDate" in img.header
    assert not [e for e in img.header.iterall() if e.tag.is_private]


@pytest.mark.parametrize("kwargs", [{"multi_frame": "all"}, {"burned_in": "ocr"}, {"burned_in": "mask"},
                                    {"mask_border": -1}, {"dates": "keep"}, {"window": (40,)},
                                    {"window": (40, 0)}])
def test_bad_parameters_raise_params_error(kwargs):
    with pytest.raises(ParamsError):
        read_dicom(get_testdata_file("CT_small.dcm"), KEY, **kwargs)
