"""Decoders under budgets they cannot exceed: a hostile corpus, each file refused while memory stays bounded.

Each case decodes in a fresh Python process so its peak memory (``ru_maxrss``) is its own;
without the guards these files cost the decoder 0.5-4 GB (see :mod:`tests.hostile`).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import hostile
import numpy as np
import pytest
from PIL import Image

#: most extra peak memory a refused file may cost a fresh process, over reading a small valid file
BOUND_MB = 150

_PROBE = r"""
import json, resource, sys
from medret.io.raster import read_raster
from medret.io.dicom import read_dicom
from medret.io.volume import read_nifti
from medret.errors import MedretError
readers = {"raster": read_raster, "dicom": read_dicom, "nifti": read_nifti}
cases, budget = json.loads(sys.argv[1]), int(sys.argv[2])
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base, out = None, []
for path, reader, warm in cases:
    data = open(path, "rb").read()
    try:
        readers[reader](data, name=path.rsplit("/", 1)[-1], pixel_budget=budget)
        result = {"ok": True}
    except MedretError as err:
        result = {"ok": False, "type": type(err).__name__, "error": str(err)}
    if warm:  # small valid files first: imports and decoder set-up count in the baseline
        base = max(base or 0.0, peak())
        continue
    out.append({**result, "extra_mb": peak() - base})
print(json.dumps(out))
"""

CASES = {
    "nifti gzip bomb": (hostile.nifti_gzip_bomb, "nifti", "inflates to more than"),
    "deflated DICOM bomb": (hostile.deflated_dicom_bomb, "dicom", "inflates to more than"),
    "JPEG SOF larger than the header": (hostile.jpeg_dicom_bomb, "dicom", "codestream declares 20000x20000"),
    "2,000-page TIFF": (hostile.many_page_tiff, "raster", "more than 256 pages"),
}


def probe(tmp_path: Path, data_dir: Path, cases: list[tuple[str, bytes, str]], budget: int = 50_000_000) -> list:
    """Decode each case in one fresh process after warming every reader on a real file; peak memory per case."""
    warm = [
        (data_dir / "mri" / "brainles__TCGA-FG-6692_t1.nii.gz", "nifti"),
        (data_dir / "dicom" / "pydicom-data__RG1_J2KI.dcm", "dicom"),
        (data_dir / "dicom" / "dcmfx__fo-dicom__CR-MONO1-10-chest.dcm", "dicom"),
    ]
    png = tmp_path / "warm.png"
    png.write_bytes(hostile.small_png()[1])
    todo = [(str(p), r, True) for p, r in [*warm, (png, "raster")]]
    for name, data, reader in cases:
        (tmp_path / name).write_bytes(data)
        todo.append((str(tmp_path / name), reader, False))
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(todo), str(budget)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return list(json.loads(r.stdout.strip().splitlines()[-1]))


def test_hostile_files_are_refused_within_a_memory_bound(tmp_path: Path, data_dir: Path) -> None:
    built = {case: (*build(), reader, says) for case, (build, reader, says) in CASES.items()}
    results = probe(tmp_path, data_dir, [(name, data, reader) for name, data, reader, _ in built.values()])
    for (case, (name, _, _, says)), out in zip(built.items(), results, strict=True):
        assert not out["ok"] and out["type"] == "PixelBudgetError", (case, out)
        assert says in out["error"] and name in out["error"], (case, out)
        assert out["extra_mb"] < BOUND_MB, (case, out)  # peak so far: every case up to here stayed bounded


def test_a_real_j2k_with_only_its_siz_edited_is_refused(data_dir: Path, tmp_path: Path) -> None:
    name, data = hostile.j2k_siz_edited(data_dir / "dicom" / "pydicom-data__RG1_J2KI.dcm")
    (out,) = probe(tmp_path, data_dir, [(name, data, "dicom")])
    assert not out["ok"] and "codestream declares 20000x20000" in out["error"], out
    assert out["extra_mb"] < BOUND_MB, out


def test_pillows_own_guard_is_never_switched_off() -> None:
    from PIL import Image

    from medret.io.raster import read_raster

    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    read_raster(hostile.small_png()[1], name="x.png", pixel_budget=10_000_000)
    assert before == Image.MAX_IMAGE_PIXELS


@pytest.mark.usefixtures("ray_local")
def test_the_indexing_job_quarantines_hostile_objects_with_the_reason(tmp_path: Path) -> None:
    """The same readers serve the job: each bomb becomes a quarantine reason, the good file is indexed."""
    from medret.index.manifest import Manifest
    from medret.pipelines.backfill import run_index
    from medret.pipelines.config import IndexJobConfig

    src = tmp_path / "src"
    src.mkdir()
    for build in (hostile.nifti_gzip_bomb, hostile.deflated_dicom_bomb, hostile.jpeg_dicom_bomb):
        name, data = build()
        (src / name).write_bytes(data)
    (src / "ok.png").write_bytes(hostile.small_png()[1])
    cfg = IndexJobConfig(
        source=str(src),
        index={"uri": str(tmp_path / "i")},
        out=str(tmp_path / "o"),
        progress=False,
        pixel_budget=50_000_000,
    )
    summary = run_index(cfg)
    assert (summary.indexed, summary.quarantined) == (1, 3)
    entries = Manifest(str(tmp_path / "i")).entries()
    reasons = {Path(u).name: e.error for u, e in entries.items() if e.status == "quarantined"}
    assert "inflates to more than" in reasons["bomb.nii.gz"]
    assert "inflates to more than" in reasons["deflated-bomb.dcm"]
    assert "codestream declares" in reasons["jpeg-bomb.dcm"]


def _jpeg(side: int = 64) -> bytearray:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(buf, format="JPEG")
    return bytearray(buf.getvalue())


def _app_segments(total: int) -> bytes:
    """APP15 segments of ``total`` bytes in all: a frame header may come after any number of them."""
    out = b""
    while total > 0:
        n = min(total, 65533)
        out += b"\xff\xef" + struct.pack(">H", n + 2) + bytes(n)
        total -= n
    return out


def _j2k(data_dir: Path) -> bytes:
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(data_dir / "dicom" / "pydicom-data__RG1_J2KI.dcm")
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def test_a_frame_header_after_200_kib_of_segments_is_still_found() -> None:
    from medret.errors import PixelBudgetError
    from medret.io.guard import check_codestreams, codestream_size

    jpeg = _jpeg()
    at = jpeg.find(b"\xff\xc0")
    jpeg[at + 5 : at + 9] = struct.pack(">HH", 20000, 20000)
    padded = bytes(jpeg[:2]) + _app_segments(200 << 10) + bytes(jpeg[2:])
    assert codestream_size(padded) == (20000, 20000, 1)
    with pytest.raises(PixelBudgetError, match="20000x20000"):
        check_codestreams(iter([padded]), "pad.dcm", rows=64, cols=64, budget=10**9)


@pytest.mark.parametrize(
    ("case", "says"),
    [("no SOF", "no frame header"), ("height 0", "declares 64x0"), ("stray bytes", "more than 1024 stray bytes")],
)
def test_a_jpeg_whose_frame_header_is_unusable_is_refused(case: str, says: str) -> None:
    from medret.errors import CorruptFileError
    from medret.io.guard import codestream_size

    jpeg = _jpeg()
    at = jpeg.find(b"\xff\xc0")
    if case == "no SOF":
        end = at + 2 + struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
        jpeg[at:end] = b""
    elif case == "height 0":
        jpeg[at + 5 : at + 7] = b"\0\0"
    else:
        one = bytes(jpeg[:at]) + b"\x00" + bytes(jpeg[at:])  # libjpeg skips a few, with a warning: so does medret
        assert codestream_size(one, "x.dcm") == (64, 64, 1)
        jpeg[at:at] = b"\x00" * 2000
    with pytest.raises(CorruptFileError, match=says):
        codestream_size(bytes(jpeg), "x.dcm")


def test_a_jp2_is_sized_by_its_codestream_box_not_by_the_first_marker_lookalike(data_dir: Path) -> None:
    from medret.errors import CorruptFileError
    from medret.io.guard import codestream_size

    real = bytearray(_j2k(data_dir))
    real[8:16] = struct.pack(">II", 20000, 20000)
    decoy = b"\xff\x4f\xff\x51" + bytes(40)  # a SOC/SIZ lookalike in an XML box before the codestream
    signature = _box(b"jP  ", b"\r\n\x87\n") + _box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
    jp2 = signature + _box(b"xml ", decoy) + _box(b"jp2c", bytes(real))
    assert codestream_size(jp2)[:2] == (20000, 20000)
    with pytest.raises(CorruptFileError, match="no codestream"):
        codestream_size(signature + _box(b"xml ", decoy), "x.dcm")


def test_a_codestream_with_more_components_than_the_header_is_refused(data_dir: Path) -> None:
    from medret.errors import PixelBudgetError
    from medret.io.guard import check_codestreams

    j2k = bytearray(_j2k(data_dir))  # 1841x1955, one component; the header claims one sample
    check_codestreams(iter([bytes(j2k)]), "a.dcm", rows=1955, cols=1841, budget=4_000_000)
    j2k[40:42] = struct.pack(">H", 3)  # Csiz: three components
    with pytest.raises(PixelBudgetError, match="declares 3 components, more than the header's 1"):
        check_codestreams(iter([bytes(j2k)]), "a.dcm", rows=1955, cols=1841, budget=4_000_000)
