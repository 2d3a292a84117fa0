"""Training from an archive: the kinds and recipes read it, Ray Data streams it to Ray Train workers.

The archives are real images: MedMNIST PNGs with a sidecar CSV on the test session's S3
server, and pydicom's own DICOM objects labelled by a DICOM attribute.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medret.config import S3Config
from medret.errors import ConfigError
from medret.models.encoder import load_encoder
from medret.train.archive import PARTS, assign_parts, prepare
from medret.train.config import TrainConfig
from medret.train.trainer import fit


def test_the_split_keeps_each_group_on_one_side_and_spreads_each_label() -> None:
    rng = np.random.default_rng(1)
    groups = [f"patient{int(g)}" for g in rng.integers(0, 120, 1000)]
    labels = [f"c{hash(g) % 3}" if i % 7 else "c9" for i, g in enumerate(groups)]
    parts = assign_parts(labels, groups, seed=3)
    assert set(parts) == set(groups) and set(parts.values()) <= set(PARTS)
    assert parts == assign_parts(labels, groups, seed=3)  # seeded
    assert parts != assign_parts(labels, groups, seed=4)
    # one item per group: exactly the 60/10/20/10 cut of every label
    single = assign_parts(["a"] * 50 + ["b"] * 30, [str(i) for i in range(80)])
    by_label = {lab: Counter(single[str(i)] for i in idx) for lab, idx in (("a", range(50)), ("b", range(50, 80)))}
    assert by_label["a"] == {"train": 30, "val": 5, "gallery": 10, "query": 5}
    assert by_label["b"] == {"train": 18, "val": 3, "gallery": 6, "query": 3}


def test_archive_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="either 'source'"):
        TrainConfig(source=str(tmp_path), data=[str(tmp_path / "x.npz")])
    with pytest.raises(ValueError, match="must be one of BodyPartExamined"):
        TrainConfig(source=str(tmp_path), label_tag="PatientName")
    with pytest.raises(ValueError, match="need a 'source'"):
        TrainConfig(labels="labels.csv")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png_archive(store: object, data_dir: Path, per_organ: int) -> list[dict[str, str]]:
    """MedMNIST breast and retina images as PNGs under organ folders, with a sidecar ``labels.csv``."""
    rows = []
    for organ in ("breastmnist", "retinamnist"):
        z = np.load(data_dir / "medmnist" / f"{organ}.npz")
        images, labels = z["train_images"][:per_organ], z["train_labels"].reshape(-1)[:per_organ]
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            key = f"{organ}/{i:04d}.png"
            store.write_bytes(key, _png(image))  # type: ignore[attr-defined]
            rows.append({"path": key, "label": str(int(label)), "organ": organ})
    text = io.StringIO()
    writer = csv.DictWriter(text, ["path", "label", "organ"])
    writer.writeheader()
    writer.writerows(rows)
    store.write_bytes("labels.csv", text.getvalue().encode())  # type: ignore[attr-defined]
    store.write_bytes("breastmnist/broken.png", b"\x89PNG\r\n\x1a\n not really")  # type: ignore[attr-defined]
    return rows


def archive_config(source: str, storage: Path, **kw: object) -> TrainConfig:
    return TrainConfig(
        **{  # type: ignore[arg-type]
            "method": "default",
            "bits": 16,
            "source": source,
            "epochs": 2,
            "batch_size": 32,
            "max_steps": 5,
            "num_workers": 2,
            "val_queries": 60,
            "name": "archive",
            "storage_path": str(storage),
            **kw,
        }
    )


@pytest.mark.slow
@pytest.mark.s3
def test_trains_from_an_s3_archive_with_its_sidecar_labels_and_resumes_after_a_kill(
    data_dir: Path, tmp_path: Path, s3_config: S3Config, s3_bucket: str
) -> None:
    from medret.storage.objects import open_store

    store = open_store(f"s3://{s3_bucket}/archive", s3_config)
    rows = write_png_archive(store, data_dir, per_organ=160)
    source, storage = f"s3://{s3_bucket}/archive", tmp_path / "runs"
    # 1. `medret train --source s3://...` on 2 CPU workers, SIGKILLed after its first checkpoint
    cmd = [
        sys.executable, "-m", "medret.cli.main", "train", "--source", source, "--bits", "16", "--epochs", "30",
        "--batch-size", "32", "--num-workers", "2", "--name", "archive", "--storage", str(storage),
        "--s3-endpoint", str(s3_config.endpoint_url), "--set", "max_steps=5", "--set", "val_queries=60", "--json",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "AWS_ACCESS_KEY_ID": str(s3_config.access_key_id)}
    env["AWS_SECRET_ACCESS_KEY"] = str(s3_config.secret_access_key)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir, deadline = storage / "archive", time.monotonic() + 400
    while time.monotonic() < deadline and len(list(run_dir.glob("checkpoint_*/meta.json"))) < 1:
        if proc.poll() is not None:
            pytest.fail(f"train exited early: {proc.stdout.read().decode()[-3000:] if proc.stdout else ''}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(run_dir.glob("checkpoint_*/meta.json")))
    assert done >= 1, "no checkpoint written before the deadline"
    # 2. the same run again: the prepared archive is reused, training resumes from the checkpoint
    cfg = archive_config(source, storage, s3=s3_config, epochs=done + 2)
    archive = prepare(cfg, cfg.geometry())
    assert sum(archive.counts.values()) == len(rows)  # every readable image, once
    assert archive.organs == ["breastmnist", "retinamnist"]
    assert archive.skipped and "broken.png" in archive.skipped[0]  # a bad file is named and left out
    report = fit(cfg)
    history = report.history
    assert [h["epoch"] for h in history] == list(range(done + 2))
    assert history[-1]["start_epoch"] == done  # resumed, not restarted
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    encoder = load_encoder(report.encoder_path)
    assert encoder.config.extra["source"] == source
    assert encoder.config.extra["classes"] == archive.classes and encoder.config.preprocess == "medmnist"


@pytest.mark.slow
def test_a_dicom_attribute_labels_the_archive(tmp_path: Path, ray_local: None) -> None:
    """pydicom's own CT and MR objects, labelled by their Modality attribute, train an encoder.
    Copies of one file share a study, so each object is made its own group."""
    from pydicom.data import get_testdata_file

    names = ["CT_small.dcm", "MR_small.dcm"]
    archive = tmp_path / "dicom"
    archive.mkdir()
    for i in range(24):
        src = Path(str(get_testdata_file(names[i % 2])))
        (archive / f"{i:02d}-{src.name}").write_bytes(src.read_bytes())
    cfg = archive_config(
        str(archive),
        tmp_path / "runs",
        label_tag="Modality",
        batch_size=8,
        epochs=1,
        max_steps=2,
        group_column="object",
    )
    prepared = prepare(cfg, cfg.geometry())
    assert prepared.classes == [["CT", "MR"]] and not prepared.skipped
    report = fit(cfg)
    assert load_encoder(report.encoder_path).config.extra["classes"] == [["CT", "MR"]]


def test_an_archive_without_labels_says_how_to_give_them(tmp_path: Path, ray_local: None) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png(np.full((28, 28), i * 40, np.uint8)))
    cfg = archive_config(str(folder), tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"no item has a label \(column 'label'\); add a labels CSV"):
        prepare(cfg, cfg.geometry())
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    got = prepare(cfg.model_copy(update={"labels": str(tmp_path / "labels.csv")}), cfg.geometry())
    assert got.classes == [["0", "1"]] and sum(got.counts.values()) == 4
    assert json.loads(got.to_json())["recipe"] == "medmnist"


def test_an_item_of_the_wrong_shape_is_an_error_row_not_a_reshaped_image() -> None:
    from medret.train.archive import training_rows

    images = np.empty(2, dtype=object)
    images[0], images[1] = np.full((28, 28), 0.5, np.float32), np.zeros((14, 56), np.float32)
    batch = {
        "ok": np.array([True, True]),
        "item_id": np.array(["a.png", "b.png"], dtype=object),
        "uri": np.array(["a.png", "b.png"], dtype=object),
        "etag": np.array(["e1", "e2"], dtype=object),
        "error": np.array(["", ""], dtype=object),
        "fault": np.array(["", ""], dtype=object),
        "extra": np.array(['{"label": "1"}', '{"label": "0"}'], dtype=object),
        "image": images,
    }
    rows = training_rows(batch, TrainConfig().model_dump_json(), (28, 28))
    assert list(rows["label"]) == ["1", ""] and rows["error"][0] == ""
    assert rows["error"][1] == "model input is (14, 56), this encoder takes (28, 28)" and rows["fault"][1] == "object"
    assert np.frombuffer(rows["image"][0], np.uint8).tolist() == [128] * 784 and rows["image"][1] == b""
    assert rows["etag"].tolist() == ["e1", "e2"] and rows["tile_x"].tolist() == rows["tile_y"].tolist() == [-1, -1]
    # a unit that gave no items (a slide unit whose tiles were all background) is no row, not an empty image
    empty = {k: v[:1].copy() for k, v in batch.items()}
    empty["ok"][0], empty["item_id"][0] = False, ""
    assert len(training_rows(empty, TrainConfig().model_dump_json(), (28, 28))["uri"]) == 0
