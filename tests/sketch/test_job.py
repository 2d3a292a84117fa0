"""The indexing job fills the lesion table: masks found beside their images (a ``_seg`` sibling, a sidecar's
``mask_path``), carried into template space by the very registration the image's slices got, and kept level
with the source as masks change, go bad, or go away, without re-encoding an image."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medret.index.store import CodeIndex
from medret.io.volume import read_nifti
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.pipelines.sources import SourceObject
from medret.sketch.data import TCGA_FLAIR, TCGA_MASK
from medret.sketch.encoder import RasterEncoder
from medret.sketch.grid import LesionGridConfig
from medret.sketch.ingest import lesion_slices, sync_lesions
from medret.sketch.store import LesionTable
from medret.storage.objects import open_store

Case = Any  # tests/sketch/conftest.py's Case: the image, its mask and the session's own registration of it
CONFIG = LesionGridConfig(labels=((1, "edema"), (2, "enhancing")))  # the conftest's, so the session's grid

pytestmark = pytest.mark.usefixtures("ray_local")


def lesion_state(index: str) -> dict[str, list[tuple[Any, ...]]]:
    """Volume -> its lesion rows (level, class, code, bits, patient, mask), in a fixed order."""
    lt = LesionTable.open(index, "codes")
    cols = ["source_uri", "level", "class", "code", "bits", "patient", "mask_uri"]
    t = lt._table.to_lance().to_table(columns=cols).to_pylist()
    out: dict[str, list[tuple[Any, ...]]] = {}
    for r in sorted(t, key=lambda r: (r["source_uri"], r["level"], r["class"])):
        out.setdefault(r["source_uri"], []).append(
            (r["level"], r["class"], tuple(r["code"]), r["bits"], r["patient"], r["mask_uri"])
        )
    return out


def expected(encoder: RasterEncoder, case: Case, mask: Path, uri: str, patient: str) -> list[tuple[Any, ...]]:
    """The rows of a volume made directly: its mask through the registration the session's own run found."""
    slices = lesion_slices(read_nifti(mask), case.result, encoder, name=str(mask))
    rows = [(s.level, s.cls, tuple(s.code.tolist()), s.bits, patient, str(mask)) for s in slices]
    return sorted(rows, key=lambda r: (r[0], r[1]))


@pytest.fixture(scope="module")
def job(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two copies of the TCGA FLAIR: one with its mask beside it as ``fla_seg.nii.gz``, one whose mask a
    sidecar names under another folder and name."""
    root = tmp_path_factory.mktemp("lesion-job")
    src = root / "src"
    (src / "sib").mkdir(parents=True)
    (src / "tcga").mkdir()
    (src / "masks").mkdir()
    shutil.copy(data_dir / TCGA_FLAIR, src / "sib" / "fla.nii.gz")
    shutil.copy(TCGA_MASK, src / "sib" / "fla_seg.nii.gz")
    shutil.copy(data_dir / TCGA_FLAIR, src / "tcga" / "fla.nii.gz")
    shutil.copy(TCGA_MASK, src / "masks" / "reviewed-lesion.nii.gz")
    (src / "tcga" / "meta.csv").write_text(
        "path,label,patient,mask_path\nfla.nii.gz,LGG,TCGA-FG-6692,../masks/reviewed-lesion.nii.gz\n"
    )
    cfg = IndexJobConfig(
        source=str(src),
        index={"uri": str(root / "index")},
        out=str(root / "out"),
        progress=False,
        incremental=True,
        lesions=CONFIG.as_dict(),
    )
    summary = run_index(cfg)
    return {"root": root, "src": src, "cfg": cfg, "index": str(root / "index"), "summary": summary}


def test_masks_are_found_beside_their_images_and_never_indexed_as_images(job: dict[str, Any]) -> None:
    s, src = job["summary"], job["src"]
    assert s.indexed == 2 and s.quarantined == 0
    sources = set(CodeIndex.open(job["index"]).to_arrow(["source_uri"]).column(0).to_pylist())
    assert sources == {str(src / "sib" / "fla.nii.gz"), str(src / "tcga" / "fla.nii.gz")}
    assert s.lesions["volumes"] == 2 and s.lesions["written"] == 2 and not s.lesions["failed"]
    assert LesionTable.open(job["index"], "codes").config == CONFIG


def test_the_jobs_rows_are_the_masks_carried_by_the_images_own_registration(
    job: dict[str, Any], encoder: RasterEncoder, tcga_case: Case
) -> None:
    """The job's rows equal the mask carried through this session's own registration of the same file
    (the recipe is deterministic), code for code; the sidecar names the patient."""
    src, got = job["src"], lesion_state(job["index"])
    sib, tcga = str(src / "sib" / "fla.nii.gz"), str(src / "tcga" / "fla.nii.gz")
    assert got[sib] == expected(encoder, tcga_case, src / "sib" / "fla_seg.nii.gz", sib, sib)
    assert got[tcga] == expected(encoder, tcga_case, src / "masks" / "reviewed-lesion.nii.gz", tcga, "TCGA-FG-6692")
    assert len(got[sib]) >= 3  # the lesion spans several levels


def test_the_service_answers_a_sketch_from_the_table_the_job_made(
    job: dict[str, Any], encoder: RasterEncoder, tcga_case: Case
) -> None:
    """End to end: the job's lesion table, served: a sketch over the real lesion finds its patient first."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service

    tg = encoder.grid
    level = int(np.argmax([(tcga_case.carried[tg.slab(i)] == 1).sum() for i in range(tg.n_levels)]))
    mask = tg.box((tcga_case.carried[tg.slab(level)] == 1).mean(axis=0)) >= 0.5
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    body = {"table": "codes", "level": level, "masks": {"edema": {"png": base64.b64encode(buf.getvalue()).decode()}}}
    api = TestClient(create_app(Service(ServiceConfig(index=job["index"], refresh_s=0))))
    r = api.post("/v1/sketch/search", json={**body, "k": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["patients_searchable"] == 2
    top = {h["patient"] for h in out["results"][:2]}  # the same lesion twice: equal Dice, in either order
    assert top == {"TCGA-FG-6692", str(job["src"] / "sib" / "fla.nii.gz")}
    assert all(h["dice"] > 0.8 and abs(h["level"] - level) <= 1 for h in out["results"][:2])


def test_masks_that_change_go_bad_or_go_away_are_followed_without_re_encoding_images(
    job: dict[str, Any], encoder: RasterEncoder, tcga_case: Case
) -> None:
    src, cfg = job["src"], job["cfg"]
    sib, tcga = str(src / "sib" / "fla.nii.gz"), str(src / "tcga" / "fla.nii.gz")
    before = lesion_state(job["index"])
    version = CodeIndex.open(job["index"]).version

    # a rerun with nothing changed touches nothing
    again = run_index(cfg.model_copy(update={"out": str(job["root"] / "again")}))
    assert again.indexed == 0 and again.lesions["unchanged"] == 2 and again.lesions["written"] == 0
    assert lesion_state(job["index"]) == before

    # the sibling mask redrawn on another grid: named as bad, its old rows removed, its image untouched
    nib.Nifti1Image(np.ones((12, 12, 12), np.uint8), np.eye(4)).to_filename(src / "sib" / "fla_seg.nii.gz")
    bad = run_index(cfg.model_copy(update={"out": str(job["root"] / "bad")}))
    assert bad.indexed == 0 and bad.quarantined == 0 and bad.lesions["removed"] == 1
    (failed,) = bad.lesions["failed"]
    assert failed["uri"] == str(src / "sib" / "fla_seg.nii.gz") and "grid" in failed["error"]
    after = lesion_state(job["index"])
    assert sib not in after and after[tcga] == before[tcga]
    assert CodeIndex.open(job["index"]).version == version  # no image was re-encoded

    # the mask fixed (an eroded lesion): its rows are remade from it, through the same recorded registration
    img = nib.load(TCGA_MASK)
    labels = np.asarray(img.dataobj)
    eroded = np.where(ndimage.binary_erosion(labels > 0, iterations=2), labels, 0).astype(np.uint8)
    nib.Nifti1Image(eroded, img.affine, img.header).to_filename(src / "sib" / "fla_seg.nii.gz")
    fixed = run_index(cfg.model_copy(update={"out": str(job["root"] / "fixed")}))
    assert fixed.indexed == 0 and fixed.lesions["written"] == 1 and not fixed.lesions["failed"]
    got = lesion_state(job["index"])
    assert got[sib] == expected(encoder, tcga_case, src / "sib" / "fla_seg.nii.gz", sib, sib) != before[sib]

    # the mask deleted: the volume's rows go, the image stays indexed
    (src / "sib" / "fla_seg.nii.gz").unlink()
    gone = run_index(cfg.model_copy(update={"out": str(job["root"] / "gone")}))
    assert gone.indexed == 0 and gone.deleted == 0 and gone.lesions["removed"] == 1
    assert set(lesion_state(job["index"])) == {tcga}
    assert CodeIndex.open(job["index"]).version == version

    # a sidecar that names a mask the source does not hold: named as failed, the volume's rows removed
    index = CodeIndex.open(job["index"])
    etag = index.to_arrow(["etag"], where=f"source_uri = '{tcga}'").column(0)[0].as_py()
    obj = SourceObject(tcga, "tcga/fla.nii.gz", etag, 0, "nifti", mask="masks/nothing.nii.gz")
    done = sync_lesions(index, [obj], open_store(str(src)), CONFIG)
    assert done is not None and done.removed == 1 and not lesion_state(job["index"])
    (failed,) = done.failed
    assert failed["uri"] == str(src / "masks" / "nothing.nii.gz") and "holds no such object" in failed["error"]


def test_the_listing_attaches_masks_to_their_images(tmp_path: Path) -> None:
    from medret.pipelines.config import default_routes
    from medret.pipelines.sources import list_source

    names = ("a/x.nii.gz", "a/x_seg.nii.gz", "a/y.nii", "a/y_mask.nii", "b/z.nii.gz", "m/lesion-of-z.nii.gz")
    names += ("d/Case.nii.gz", "d/Case_SEG.nii.gz", "e/v.nii.gz", "e/v_mask.nii.gz", "e/v_seg.nii.gz")
    for name in (*names, "c/brain_mask.nii.gz"):  # the last: a mask-like name with no image beside it
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "b" / "meta.csv").write_text(
        "path,label,mask_path\nz.nii.gz,1,../m/lesion-of-z.nii.gz\nw.nii.gz,2,gone.nii.gz\n"
    )
    (tmp_path / "b" / "w.nii.gz").write_bytes(b"w")
    objects, _ = list_source(open_store(str(tmp_path)), default_routes())
    got = {o.key: (o.mask, bool(o.mask_etag), o.meta) for o in objects}
    assert got == {
        "a/x.nii.gz": ("a/x_seg.nii.gz", True, {}),
        "a/y.nii": ("a/y_mask.nii", True, {}),
        "b/z.nii.gz": ("m/lesion-of-z.nii.gz", True, {"label": "1"}),  # mask_path is no metadata of the image
        "b/w.nii.gz": ("b/gone.nii.gz", False, {"label": "2"}),  # named, not held: the job lists it as failed
        "c/brain_mask.nii.gz": ("", False, {}),  # no brain.nii.gz beside it: a volume of its own
        "d/Case.nii.gz": ("d/Case_SEG.nii.gz", True, {}),  # the suffix in any case
        "e/v.nii.gz": ("e/v_seg.nii.gz", True, {}),  # _seg before _mask; the other is left out, neither indexed
    }


def test_the_jobs_lesions_config_is_checked_by_name() -> None:
    cfg = IndexJobConfig(source="x", lesions={"labels": [[1, "necrotic"], [2, "edema"], [4, "enhancing"]]})
    assert cfg.lesion_config().classes == ["necrotic", "edema", "enhancing"]
    assert IndexJobConfig(source="x").lesion_config() == LesionGridConfig()
    with pytest.raises(ValueError, match="unknown lesions field"):
        IndexJobConfig(source="x", lesions={"grid_size": 32})
    with pytest.raises(ValueError, match="multiple of 64 bits"):
        IndexJobConfig(source="x", lesions={"grid": 3})
    with pytest.raises(ValueError, match="unknown mosaic field"):
        IndexJobConfig(source="x", mosaic={"cluster": 3})


def test_a_store_that_fails_while_masks_are_read_stops_the_sync_and_removes_nothing(
    tmp_path: Path, encoder: RasterEncoder, tcga_case: Case
) -> None:
    """Masks on a real S3 server (SeaweedFS) that is then stopped: the sync raises the store's fault (what
    stops the job with nothing quarantined), names no mask as bad and leaves the rows it had; once the server
    is back the same sync makes the new rows."""
    import json

    from medret.errors import InfrastructureError
    from medret.models.encoder import EncoderConfig
    from medret.storage.retry import RetryingStore
    from medret.storage.s3local import SeaweedS3, free_port

    server = SeaweedS3(tmp_path / "weed", port=free_port(), access_key="mask-key", secret_key="mask-secret").start()
    try:
        s3 = server.config().model_copy(update={"max_attempts": 1, "connect_timeout_s": 1.0, "read_timeout_s": 3.0})
        bucket = open_store("s3://masks", s3)
        bucket.ensure_bucket()
        store = RetryingStore(bucket, budget_s=2)
        put = store.write_bytes("vol_seg.nii.gz", TCGA_MASK.read_bytes())
        # the code table as the job leaves it: the volume indexed at etag e1, its first slice recording the
        # registration the recipe used (the session's own, of the same FLAIR)
        index = CodeIndex.create(str(tmp_path / "index"), EncoderConfig(name="pca-itq", bits=16, weights_sha256="x"))
        reg = {**tcga_case.result.registration.as_dict(), "subject": tcga_case.result.subject.grid.as_dict()}
        index.upsert(
            index.rows(
                ["s3://masks/vol.nii.gz#level=0"],
                np.zeros((1, 2), np.uint8),
                source_uri=["s3://masks/vol.nii.gz"],
                etag=["e1"],
                extra=[json.dumps({"registration": reg})],
            )
        )
        obj = SourceObject("s3://masks/vol.nii.gz", "vol.nii.gz", "e1", 0, "nifti", mask="vol_seg.nii.gz")
        obj.mask_etag = put.etag
        first = sync_lesions(index, [obj], store, CONFIG)
        assert first is not None and first.written == 1 and not first.failed
        rows = lesion_state(str(tmp_path / "index"))["s3://masks/vol.nii.gz"]
        assert [r[:4] for r in rows] == [r[:4] for r in expected(encoder, tcga_case, TCGA_MASK, "", "")]

        obj.mask_etag = "a-new-mask"  # the listing saw the mask change, then the store went down
        server.stop()
        with pytest.raises(InfrastructureError):
            sync_lesions(index, [obj], store, CONFIG)
        assert lesion_state(str(tmp_path / "index"))["s3://masks/vol.nii.gz"] == rows  # nothing removed

        server.start()
        again = sync_lesions(index, [obj], store, CONFIG)
        assert again is not None and again.written == 1 and not again.failed and again.removed == 0
    finally:
        server.stop()


def test_runs_over_other_sources_keep_their_volumes_rows(tmp_path: Path, tcga_case: Case) -> None:
    """Rows go only for a volume this run lists without a mask or whose codes left the table: a run over
    another source leaves the first source's volumes alone. A mask with no lesion makes no rows and no
    error; a registration to another template than the lesion grid's is refused by name."""
    import json

    from medret.models.encoder import EncoderConfig

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TCGA_MASK, src / "a_seg.nii.gz")
    shutil.copy(TCGA_MASK, src / "b_seg.nii.gz")
    img = nib.load(TCGA_MASK)
    nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header).to_filename(src / "c_seg.nii.gz")
    store = open_store(str(src))
    index = CodeIndex.create(str(tmp_path / "index"), EncoderConfig(name="pca-itq", bits=16, weights_sha256="x"))
    reg = {**tcga_case.result.registration.as_dict(), "subject": tcga_case.result.subject.grid.as_dict()}
    uris = {v: f"s3://site-{v}/{v}.nii.gz" for v in "abcd"}
    regs = {**{v: reg for v in "abc"}, "d": {**reg, "template": "mni152"}}
    index.upsert(
        index.rows(
            [f"{u}#level=0" for u in uris.values()],
            np.zeros((4, 2), np.uint8),
            source_uri=list(uris.values()),
            etag=["e1"] * 4,
            extra=[json.dumps({"registration": regs[v]}) for v in uris],
        )
    )

    def obj(v: str, mask: bool = True) -> SourceObject:
        o = SourceObject(uris[v], f"{v}.nii.gz", "e1", 0, "nifti", mask=f"{v}_seg.nii.gz" if mask else "")
        o.mask_etag = store.info(f"{'a' if v == 'd' else v}_seg.nii.gz").etag if mask else ""
        if v == "d":
            o.mask = "a_seg.nii.gz"
        return o

    def volumes() -> set[str]:
        return set(lesion_state(str(tmp_path / "index")))

    first = sync_lesions(index, [obj("a")], store, CONFIG)  # a run over site a
    assert first is not None and first.written == 1 and volumes() == {uris["a"]}
    other = sync_lesions(index, [obj("b"), obj("c")], store, CONFIG)  # a run over sites b and c
    assert other is not None and other.written == 1 and other.removed == 0 and other.empty == 1
    assert not other.failed and volumes() == {uris["a"], uris["b"]}
    index.delete_sources([uris["a"]])  # site a's image left the index (an incremental run removed it)
    gone = sync_lesions(index, [obj("b", mask=False)], store, CONFIG)  # and b is now listed without its mask
    assert gone is not None and gone.removed == 2 and volumes() == set()
    wrong = sync_lesions(index, [obj("d")], store, CONFIG)
    assert wrong is not None and not volumes()
    (failed,) = wrong.failed
    assert "'mni152' template" in failed["error"] and "lesions.template" in failed["error"]
