"""2-D readers on the real radiographs and pydicom's test files, decoded by the real libraries."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydicom.data import get_testdata_file

from medret.errors import CorruptFileError, NotAnImageError, UnsupportedFormatError
from medret.io.dicom import parse_dicom, read_dicom
from medret.io.raster import read_raster
from medret.kinds import detect
from medret.preprocess.recipes import RECIPES
from medret.preprocess.xray import apply_voi, resize_aspect

XRAY_DICOMS = [
    "dicom/dcmfx__fo-dicom__CR-MONO1-10-chest.dcm",
    "dicom/pydicom-data__RG1_J2KI.dcm",
    "dicom/pydicom-data__RG3_J2KI.dcm",
    "dicom/pydicom-data__RG3_J2KR.dcm",
    "cxr/txv__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
]

# pydicom's own files, one per transfer syntax / photometric family we must decode.
PYDICOM_FILES = {
    "CT_small.dcm": (128, 128),
    "MR_small_implicit.dcm": (64, 64),
    "MR_small_bigendian.dcm": (64, 64),
    "MR_small_RLE.dcm": (64, 64),
    "MR_small_jp2klossless.dcm": (64, 64),
    "MR_small_jpeg_ls_lossless.dcm": (64, 64),
    "JPEG-lossy.dcm": (1024, 256),  # 12-bit JPEG extended (imagecodecs)
    "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),  # YBR_FULL JPEG baseline
    "SC_ybr_full_422_uncompressed.dcm": (100, 100, 3),
    "SC_rgb_rle_2frame.dcm": (2, 100, 100, 3),
    "examples_palette.dcm": (350, 800, 3),
    "examples_ybr_color.dcm": (30, 240, 320, 3),  # multi-frame US
    "693_J2KI.dcm": (512, 512),
}


@pytest.mark.parametrize("rel", XRAY_DICOMS)
def test_xray_dicoms_decode_and_window(data_dir: Path, rel: str) -> None:
    d = read_dicom(data_dir / rel)
    assert d.pixels.ndim == 2 and d.pixels.dtype == np.float32
    assert d.pixels.std() > 1.0  # real content, not a blank array
    assert d.meta["modality"] == "CR"
    [prepared] = RECIPES.get("xray")(d, input_size=(128, 128))
    img = prepared.image
    assert img.shape == (128, 128) and img.min() >= 0.0 and img.max() <= 1.0
    # Lungs are dark, the mediastinum/bone bright after correct windowing and inversion:
    # the centre column is brighter than the mean of the image (on every chest film here).
    if d.meta.get("body_part") == "CHEST":
        centre = img[32:96, 56:72].mean()
        lungs = np.r_[img[40:90, 24:44].ravel(), img[40:90, 84:104].ravel()].mean()
        assert centre > lungs, f"{rel}: mediastinum {centre:.2f} not brighter than lungs {lungs:.2f}"


def test_monochrome1_is_inverted(data_dir: Path) -> None:
    d = read_dicom(data_dir / "dicom/pydicom-data__RG3_J2KR.dcm")
    assert d.display.photometric == "MONOCHROME1"
    raw = apply_voi(d.pixels, d.display)
    [p] = RECIPES.get("xray")(d, input_size=(d.pixels.shape[0], d.pixels.shape[1]))
    np.testing.assert_allclose(p.image, 1.0 - raw, atol=1e-3)


def test_acr_nema_without_transfer_syntax(data_dir: Path) -> None:
    path = data_dir / "dicom/dcmfx__fo-dicom__CR-MONO1-10-chest.dcm"
    assert path.read_bytes()[128:132] != b"DICM"
    assert detect(path.name, path.read_bytes()[:352]).name == "dicom"
    d = read_dicom(path)
    assert d.meta["transfer_syntax"] == "1.2.840.10008.1.2"  # implicit VR little endian fallback
    assert d.pixels.shape == (440, 440) and d.display.bits_stored == 10
    assert d.display.window_center == (550.0,)


def test_jpeg2000_lossless_equals_lossy_closely(data_dir: Path) -> None:
    lossless = read_dicom(data_dir / "dicom/pydicom-data__RG3_J2KR.dcm").pixels
    lossy = read_dicom(data_dir / "dicom/pydicom-data__RG3_J2KI.dcm").pixels
    assert lossless.shape == lossy.shape
    assert np.abs(lossless - lossy).mean() < 0.01 * lossless.max()


def test_spacing_and_uids(data_dir: Path) -> None:
    d = read_dicom(data_dir / XRAY_DICOMS[-1])
    assert d.spacing == (0.168, 0.168)
    assert d.meta["view_position"] == "PA" and d.meta["body_part"] == "CHEST"
    assert d.meta["instance_uid"].startswith("1.2.276.0.7230010")
    [p] = RECIPES.get("xray")(d, input_size=(256, 256))
    assert p.meta["spacing_mm"] == [0.672, 0.672]  # 1024 px at 0.168 mm -> 256 px


@pytest.mark.parametrize("name,shape", sorted(PYDICOM_FILES.items()))
def test_pydicom_transfer_syntaxes(name: str, shape: tuple[int, ...]) -> None:
    d = read_dicom(get_testdata_file(name))
    assert d.pixels.shape == shape
    assert float(d.pixels.max()) > float(d.pixels.min())
    for p in RECIPES.get("xray")(d, input_size=(32, 32)):
        assert p.image.shape == (32, 32) and np.isfinite(p.image).all()


def test_compressed_matches_uncompressed() -> None:
    ref = read_dicom(get_testdata_file("MR_small.dcm")).pixels
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(read_dicom(get_testdata_file(name)).pixels, ref, err_msg=name)


@pytest.mark.parametrize("name", ["test-SR.dcm", "rtplan.dcm", "rtstruct.dcm", "waveform_ecg.dcm"])
def test_non_image_dicom(name: str) -> None:
    with pytest.raises(NotAnImageError, match="holds no pixel data") as err:
        read_dicom(get_testdata_file(name))
    assert name in str(err.value)


PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs", "AccessionNumber")


@pytest.mark.parametrize("rel", [*XRAY_DICOMS, "wsi/pathml__small_dicom.dcm"])
def test_no_phi_leaves_the_reader(data_dir: Path, rel: str, tmp_path: Path) -> None:
    """Write the reader's metadata into a real index row and look for every PHI value of the file in it."""
    from medret.index.store import CodeIndex
    from medret.models.encoder import EncoderConfig

    raw = (data_dir / rel).read_bytes()
    ds = parse_dicom(raw, rel, stop_before_pixels=True)
    phi = [str(ds.get(k)) for k in PHI_KEYWORDS if ds.get(k) not in (None, "")]
    phi = [v for v in phi if len(v) >= 3]
    meta = parse_dicom_meta(raw, rel)
    row = {
        "item_id": rel,
        "source_uri": rel,
        "etag": "x",
        "modality": meta.get("modality", ""),
        "study_uid": meta.get("study_uid", ""),
        "series_uid": meta.get("series_uid", ""),
        "instance_uid": meta.get("instance_uid", ""),
        "extra": json.dumps(meta),
        "code": [0, 0],
    }
    encoder = EncoderConfig(name="pca-itq", bits=16)
    row |= {"encoder_id": encoder.encoder_id, "indexed_at": datetime.now(UTC)}
    index = CodeIndex.create(str(tmp_path / "idx"), encoder)
    index.upsert(pa.Table.from_pylist([row]))
    stored = json.dumps(index.to_arrow().to_pylist(), default=str)
    assert phi, "the fixture should hold some PHI to look for"
    for value in phi:
        assert value not in stored, f"{value!r} from {rel} leaked into the index row"
    salted = parse_dicom_meta(raw, rel, salt="pepper")
    if ds.get("PatientID"):
        assert len(salted["patient_pseudo_id"]) == 24 and str(ds.PatientID) not in json.dumps(salted)


def parse_dicom_meta(raw: bytes, rel: str, salt: str | None = None) -> dict[str, object]:
    from medret.io.dicom import safe_metadata

    return safe_metadata(parse_dicom(raw, rel, stop_before_pixels=True), salt=salt)


@pytest.mark.parametrize("rel", sorted(p for p in ["cxr/txv__00000001_000.png", "cxr/txv__16747_3_1.jpg"]))
def test_raster_images(data_dir: Path, rel: str) -> None:
    d = read_raster(data_dir / rel)
    assert d.pixels.dtype == np.uint8 and d.pixels.shape[0] > 100
    [p] = RECIPES.get("xray")(d, input_size=(64, 64))
    assert p.image.shape == (64, 64) and 0.2 < p.image.mean() < 0.8


def test_sixteen_bit_png_and_tiff(tmp_path: Path) -> None:
    from PIL import Image

    arr = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    for ext in ("png", "tif"):
        path = tmp_path / f"grey16.{ext}"
        Image.fromarray(arr).save(path)
        d = read_raster(path)
        np.testing.assert_array_equal(d.pixels.astype(np.uint16), arr)


def test_content_beats_extension(data_dir: Path, tmp_path: Path) -> None:
    png_as_dcm = tmp_path / "really-a-png.dcm"
    png_as_dcm.write_bytes((data_dir / "cxr/txv__00000001_000.png").read_bytes())
    assert detect(png_as_dcm.name, png_as_dcm.read_bytes()[:352]).name == "raster"
    with pytest.raises(CorruptFileError, match="named like a .dcm file"):
        detect("x.dcm", b"just some text that is not an image at all")
    with pytest.raises(UnsupportedFormatError, match="no reader"):
        detect("x.txt", b"just some text that is not an image at all")


def test_resize_keeps_aspect() -> None:
    img = np.zeros((200, 100), np.float32)
    img[:, 50:] = 1.0
    out, spacing = resize_aspect(img, (64, 64), (0.1, 0.1))
    assert out.shape == (64, 64)
    assert out[:, :16].max() == 0 and out[:, 48:].max() == 0  # letterbox bars
    assert spacing == pytest.approx((200 * 0.1 / 64, 100 * 0.1 / 32))
