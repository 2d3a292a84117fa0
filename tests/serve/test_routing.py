"""Which table answers an upload named no table: one that records its kind, else one that records none.

Real LanceDB tables on tmp_path, made with the shipped encoder's config; nothing is encoded.
(The whole path, from a routed indexing job to answers at distance 0, is tests/pipelines/test_routed.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret import kinds
from medret.errors import NotFound
from medret.index.labels import LabelNames
from medret.index.store import CodeIndex
from medret.models.encoder import checkpoint_config
from medret.models.pretrained import encoder_path
from medret.serve.config import ServiceConfig
from medret.serve.search import Searcher
from medret.serve.tables import Tables

ALL = [k.name for k in kinds.indexed()]


def table(index: Path, name: str, serves: tuple[str, ...] | None) -> CodeIndex:
    idx = CodeIndex.create(str(index), checkpoint_config(encoder_path("default")), table=name, checkpoint="default")
    if serves is not None:
        idx.set_serves(serves)
    return idx


def test_an_upload_goes_to_a_table_that_records_its_kind_else_to_one_that_records_none(tmp_path: Path) -> None:
    index = tmp_path / "index"
    table(index, "codes", None)  # a one-encoder job's table: every kind
    table(index, "slides", ("wsi",))
    table(index, "xrays", ("dicom",))
    tables = Tables(ServiceConfig(index=str(index)))
    assert {k: tables.for_kind(k) for k in ("wsi", "dicom", "raster", "nifti")} == {
        "wsi": "slides",
        "dicom": "xrays",
        "raster": "codes",
        "nifti": "codes",
    }
    described = {t["name"]: (t["kinds"], t["modality"]) for t in tables.describe()}
    assert described == {"codes": (ALL, "any"), "slides": (["wsi"], "any"), "xrays": (["dicom"], "any")}
    # the configured default table wins among those that serve the kind, and only there
    both = Tables(ServiceConfig(index=str(index), table="codes"))
    assert (both.for_kind("raster"), both.for_kind("wsi")) == ("codes", "slides")


def test_an_index_of_routed_tables_names_the_kinds_when_none_serves_the_upload(tmp_path: Path) -> None:
    index = tmp_path / "index"
    table(index, "slides", ("wsi",))
    table(index, "xrays", ("dicom",))
    tables = Tables(ServiceConfig(index=str(index)))
    with pytest.raises(NotFound, match=r"serves nifti objects .*slides: wsi; xrays: dicom"):
        tables.for_kind("nifti")
    with pytest.raises(NotFound, match="no code tables"):
        Tables(ServiceConfig(index=str(tmp_path / "empty"))).for_kind("wsi")


def test_a_running_service_sees_the_kinds_a_later_job_records(tmp_path: Path) -> None:
    index = tmp_path / "index"
    table(index, "codes", ("raster", "dicom"))
    tables = Tables(ServiceConfig(index=str(index), refresh_s=0))
    assert tables.for_kind("dicom") == "codes"
    table(index, "xrays", None)
    CodeIndex.open(str(index), table="codes").set_serves(("raster",))  # a routed job moved dicom elsewhere
    assert tables.open("codes").serves == ("raster",)
    assert tables.for_kind("dicom") == "xrays"


def test_hits_carry_the_class_names_of_their_labels(tmp_path: Path) -> None:
    """What the page shows: ``label_name`` where a label is a class id with a name."""
    idx = table(tmp_path / "index", "codes", None)
    codes = np.zeros((4, 6), np.uint8)
    labels, datasets = ["2", "10", "pneumonia", "1"], ["medmnist/retina", "medmnist/organamnist", "cxr", "mine"]
    idx.upsert(idx.rows(["a", "b", "c", "d"], codes, source_uri=["a", "b", "c", "d"], label=labels, dataset=datasets))
    rows = Searcher(ServiceConfig(index=str(tmp_path / "index")), Tables(ServiceConfig())).search(idx, codes[0], 4)
    assert [r.get("label_name") for r in rows] == ["retina: grade 2", "abdomen: spleen", None, None]
    # an encoder that names its classes names the ids no dataset does
    idx.encoder = idx.encoder.model_copy(update={"extra": {**idx.encoder.extra, "class_names": {"1": "nodule"}}})
    rows = Searcher(ServiceConfig(index=str(tmp_path / "index")), Tables(ServiceConfig())).search(idx, codes[0], 4)
    assert [r.get("label_name") for r in rows] == ["retina: grade 2", "abdomen: spleen", None, "nodule"]
    assert LabelNames({"labels": 20}).name("3", "x") is None  # a class count is no names
    assert LabelNames().name("1", "medmnist/chest") == "chest: pneumonia"
    assert LabelNames().name("0", "medmnist/breast") == "breast: malignant"


def test_warming_up_loads_every_table_a_routed_job_wrote(tmp_path: Path) -> None:
    from medret.serve.engine import QueryEngine

    index = tmp_path / "index"
    table(index, "codes", None)
    table(index, "slides", ("wsi",))
    table(index, "other", None)
    engine = QueryEngine(ServiceConfig(index=str(index)))
    engine.warm()
    warmed = {n for n in ("codes", "slides", "other") if engine.index(n)._snapshot is not None}
    assert warmed == {"codes", "slides"}  # the default table and the routed one; not every table of the index
