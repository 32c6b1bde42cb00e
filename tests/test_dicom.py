"""Decoding and preprocessing of chest X-ray files (tasks.data.dicom) on small crafted DICOMs and pydicom-data's RG1
film."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage,
    generate_uid,
)

from tasks.data.dicom import ImageRejected, load_dicom, load_jpg, square_reduce


def phantom(rows: int, columns: int, maximum: int = 4095) -> np.ndarray:
    """A smooth picture with a bright disc left of centre: asymmetric, so flips and shifts show."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    picture = 0.3 + 0.2 * np.sin(x / 7.0) * np.cos(y / 5.0) + 0.1 * x / columns
    picture[(y - rows * 0.5) ** 2 + (x - columns * 0.35) ** 2 < (min(rows, columns) * 0.15) ** 2] = 0.95
    return np.rint(picture * maximum).astype(np.uint16)


def dicom_dataset(stored: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = 12 if stored.dtype.itemsize == 2 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.ViewPosition = "AP"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.tobytes()
    return ds


def save(ds: Dataset, path: Path, syntax: UID = ExplicitVRLittleEndian) -> Path:
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_and_monochrome2_encodings_give_the_same_image(tmp_path):
    picture = phantom(90, 120)
    mono2 = save(dicom_dataset(picture, "MONOCHROME2"), tmp_path / "mono2.dcm")
    mono1 = save(dicom_dataset(4095 - picture, "MONOCHROME1"), tmp_path / "mono1.dcm")
    image2, header2 = load_dicom(mono2, 30)
    image1, header1 = load_dicom(mono1, 30)
    assert (header1.photometric, header2.photometric) == ("MONOCHROME1", "MONOCHROME2")
    # Same picture, so the same grey levels up to float rounding at exact .5 boundaries.
    assert np.abs(image1.astype(int) - image2.astype(int)).max() <= 1
    # Bone bright: the disc, the largest stored value in MONOCHROME2, is the brightest part of both.
    assert image1[15, 10] > 200 and image2[15, 10] > 200


def test_rescale_slope_intercept_and_window_follow_the_dicom_formula(tmp_path):
    stored = phantom(64, 64)
    path = save(dicom_dataset(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=[3000, 50],
                              WindowWidth=[4001, 10]), tmp_path / "rescaled.dcm")
    image, _ = load_dicom(path, 64)  # 64 px in, 64 px out: no resampling, only the value mapping
    modality = stored * 2.0 - 1000.0
    # PS3.3 C.11.2.1.2.1 linear window with the first of the two alternative windows (centre 3000, width 4001).
    expected = np.clip((modality - 2999.5) / 4000.0 + 0.5, 0.0, 1.0) * 255.0
    assert np.abs(image - expected).max() <= 0.5 + 1e-3
    assert image.min() == 0 and image.max() == 255  # the window clips both ends of this picture


def test_voi_lut_sequence_is_applied(tmp_path):
    stored = phantom(32, 32)
    lut_item = Dataset()
    lut_item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    lut_item.add_new("LUTData", "US", [value * value // 256 for value in range(4096)])  # a gamma-like curve
    ds = dicom_dataset(stored)
    ds.VOILUTSequence = [lut_item]
    image, _ = load_dicom(save(ds, tmp_path / "voilut.dcm"), 32)
    lut = np.array(lut_item.LUTData, dtype=np.float64)
    expected = (lut[stored] - lut.min()) / (lut.max() - lut.min()) * 255.0
    assert np.abs(image - expected).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "j2k"])
def test_lossless_encodings_decode_to_the_uncompressed_pixels(tmp_path, syntax):
    picture = phantom(100, 80)
    plain, plain_header = load_dicom(save(dicom_dataset(picture, "MONOCHROME1"), tmp_path / "plain.dcm"), 24)
    packed, packed_header = load_dicom(save(dicom_dataset(picture, "MONOCHROME1"), tmp_path / "packed.dcm", syntax), 24)
    assert packed_header.transfer_syntax == syntax != plain_header.transfer_syntax
    np.testing.assert_array_equal(packed, plain)


def test_real_chest_film_rg1_uncompressed_and_jpeg2000_agree():
    uncompressed, j2k = get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("RG1_J2KR.dcm")
    if uncompressed is None or j2k is None:
        pytest.skip("pydicom-data's RG1 files are not installed")
    image, header = load_dicom(Path(uncompressed), 128)
    np.testing.assert_array_equal(load_dicom(Path(j2k), 128)[0], image)
    assert (header.rows, header.columns, header.photometric) == (1955, 1841, "MONOCHROME1")
    # A PA chest film with bone bright: the spine and mediastinum (centre column) outshine both lung fields.
    spine = image[30:80, 58:70].mean()
    lungs = min(image[30:80, 20:40].mean(), image[30:80, 88:108].mean())
    assert spine > lungs + 20


@pytest.mark.parametrize("shape", [(90, 150), (150, 90)], ids=["landscape", "portrait"])
def test_shorter_side_scaled_and_centre_square_kept(tmp_path, shape):
    rows, columns = shape
    picture = phantom(rows, columns)
    window = {"WindowCenter": 2048, "WindowWidth": 4096}  # a fixed mapping, so cropping cannot change the grey levels
    whole, _ = load_dicom(save(dicom_dataset(picture, **window), tmp_path / "whole.dcm"), 30)
    top, left = (rows - 90) // 2, (columns - 90) // 2
    centre = np.ascontiguousarray(picture[top:top + 90, left:left + 90])
    cropped, _ = load_dicom(save(dicom_dataset(centre, **window), tmp_path / "centre.dcm"), 30)
    assert whole.shape == (30, 30)
    np.testing.assert_array_equal(whole, cropped)


def test_centre_marker_stays_at_the_centre_with_a_non_integer_scale(tmp_path):
    picture = np.full((101, 157), 1000, dtype=np.uint16)
    picture[45:56, 73:84] = 4000  # an 11 px marker centred on (50, 78), the image centre
    image, _ = load_dicom(save(dicom_dataset(picture), tmp_path / "marker.dcm"), 40)  # 101 / 40: box 2, then 50 -> 40
    weights = image.astype(np.float64) - image.min()
    y, x = np.mgrid[0:40, 0:40]
    centroid = (weights * y).sum() / weights.sum(), (weights * x).sum() / weights.sum()
    np.testing.assert_allclose(centroid, (19.5, 19.5), atol=0.5)


def test_square_reduce_is_the_box_average_of_the_centre_square():
    pixels = np.random.default_rng(1).integers(0, 4096, size=(23, 37)).astype(np.uint16)
    reduced = square_reduce(pixels, 7)  # factor 3: the 23 px square trimmed to 21, one row and column off each end
    box = pixels[1:22, 8:29].reshape(7, 3, 7, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(reduced, box, rtol=1e-6)


@pytest.mark.parametrize("max_value, factor", [(4095, 4), (4095, 5), (255, 16), (65535, 2)],
                         ids=["12-bit-16-bit-sums", "12-bit-too-many-for-16-bits", "8-bit", "16-bit"])
def test_square_reduce_with_a_bound_sums_exactly_whatever_the_accumulator(max_value, factor):
    # Every pixel at the bound: the sums are the largest they can be, so a 16-bit accumulator that wrapped shows.
    dtype = np.uint8 if max_value == 255 else np.uint16
    pixels = np.full((factor * 6 + 1, factor * 8), max_value, dtype=dtype)
    pixels[::7, ::5] = np.random.default_rng(2).integers(0, max_value, size=pixels[::7, ::5].shape)
    bounded = square_reduce(pixels, 6, max_value)
    assert bounded.dtype == np.float32 and bounded.shape == (6, 6)
    np.testing.assert_array_equal(bounded, square_reduce(pixels, 6))


def test_jpg_takes_the_same_path_minus_dicom(tmp_path):
    # A smooth picture (as a film is at this scale) whose centre square falls on whole pixels after the JPEG
    # decoder's 1/4 DCT scaling, so only the filters differ: box average (DICOM) vs DCT scaling + bilinear (JPG).
    coarse = phantom(80, 100, maximum=255).astype(np.uint8)
    picture = np.asarray(Image.fromarray(coarse).resize((400, 320), Image.Resampling.BICUBIC))
    jpg = tmp_path / "image.jpg"
    Image.fromarray(picture).save(jpg, quality=95)
    from_jpg, header = load_jpg(jpg, 64)
    identity = {"WindowCenter": 128, "WindowWidth": 256}  # the linear window maps stored x to grey level x
    from_dicom, _ = load_dicom(save(dicom_dataset(picture, **identity), tmp_path / "image.dcm"), 64)
    assert (header.rows, header.columns, header.transfer_syntax) == (320, 400, None)
    assert np.abs(from_jpg.astype(int) - from_dicom.astype(int)).mean() < 1.0


def _truncated(tmp_path: Path) -> Path:
    data = save(dicom_dataset(phantom(64, 64)), tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.dcm"


def _truncated_j2k(tmp_path: Path) -> Path:
    data = save(dicom_dataset(phantom(64, 64)), tmp_path / "whole.dcm", JPEG2000Lossless).read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) * 9 // 10])
    return tmp_path / "truncated.dcm"


def _text_named_dcm(tmp_path: Path) -> Path:
    (tmp_path / "notes.dcm").write_text("FINAL REPORT\n IMPRESSION: No acute process.\n" * 20)
    return tmp_path / "notes.dcm"


def _mpeg2(tmp_path: Path) -> Path:
    ds = dicom_dataset(np.zeros((8, 8), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video: no pydicom decoder
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    return save(ds, tmp_path / "video.dcm")


def _no_pixel_data(tmp_path: Path) -> Path:
    ds = dicom_dataset(np.zeros((8, 8), dtype=np.uint8))
    del ds.PixelData
    return save(ds, tmp_path / "structured_report.dcm")


def _corrupt_j2k(tmp_path: Path) -> Path:
    ds = dicom_dataset(phantom(64, 64))
    ds.compress(JPEG2000Lossless)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])  # J2K markers, then garbage
    return save(ds, tmp_path / "corrupt.dcm")


def _nine_bit_voi_lut(tmp_path: Path) -> Path:
    ds = dicom_dataset(phantom(16, 16))
    lut_item = Dataset()
    lut_item.add_new("LUTDescriptor", "US", [4096, 0, 9])  # DICOM allows 8 or 10-16 bits per entry
    lut_item.add_new("LUTData", "US", list(range(4096)))
    ds.VOILUTSequence = [lut_item]
    return save(ds, tmp_path / "bad_lut.dcm")


def _zero_window_width(tmp_path: Path) -> Path:
    return save(dicom_dataset(phantom(16, 16), WindowCenter=100, WindowWidth=0, VOILUTFunction="SIGMOID"),
                tmp_path / "zero_width.dcm")


@pytest.mark.parametrize("make, reason", [
    (lambda tmp_path: tmp_path / "absent.dcm", "missing_file"),
    (_truncated, "truncated"),
    (_truncated_j2k, "truncated"),
    (_text_named_dcm, "not_dicom"),
    (_mpeg2, "unsupported_transfer_syntax"),
    (_no_pixel_data, "no_pixel_data"),
    (_corrupt_j2k, "decode_error"),
    (_nine_bit_voi_lut, "decode_error"),
    (_zero_window_width, "decode_error"),
], ids=["missing", "truncated", "truncated-j2k", "text", "mpeg2", "no-pixels", "corrupt-j2k", "bad-voi-lut",
       "zero-window"])
def test_bad_files_are_rejected_with_a_stable_reason_naming_the_file(tmp_path, make, reason, caplog):
    path = make(tmp_path)
    with warnings.catch_warnings(record=True) as warned:  # the filters in force, tasks.data.dicom's among them
        with pytest.raises(ImageRejected) as caught:
            load_dicom(path, 16)
    assert caught.value.reason == reason
    assert str(path) in caught.value.detail
    # What pydicom says about a cut-short film names no file; the reject does, and is all that is said.
    assert not [str(w.message) for w in warned if "no filename" in str(w.message)]
    assert not [r.getMessage() for r in caplog.records if "no filename" in r.getMessage()]


def test_bad_jpgs_are_rejected(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(phantom(64, 64, maximum=255).astype(np.uint8)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    (tmp_path / "notes.jpg").write_text("not an image")
    reasons = {}
    for name in ("cut.jpg", "notes.jpg"):
        with pytest.raises(ImageRejected) as caught:
            load_jpg(tmp_path / name, 16)
        reasons[name] = caught.value.reason
    assert reasons == {"cut.jpg": "truncated", "notes.jpg": "decode_error"}


def test_bits_above_bits_stored_are_ignored(tmp_path):
    """Uncompressed films are read as a view of PixelData; overlay bits above BitsStored must not leak in."""
    stored = phantom(96, 80)
    clean, _ = load_dicom(save(dicom_dataset(stored), tmp_path / "clean.dcm"), 32)
    dirty = stored.copy()
    dirty[20:60, 10:50] |= np.uint16(0xA000)  # bits 13 and 15 set in a patch, as an overlay in the unused bits
    noisy, _ = load_dicom(save(dicom_dataset(dirty), tmp_path / "dirty.dcm"), 32)
    np.testing.assert_array_equal(noisy, clean)
