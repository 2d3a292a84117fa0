"""``medret evaluate`` on user .npz files and the shipped encoder; ONNX parity on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medret.cli.main import main
from medret.eval.benchmarks import split_from_files
from medret.eval.plots import map_curve, pr_by_radius
from medret.eval.retrieval import evaluate_encoder
from medret.models.hashnet import TorchHashEncoder
from medret.models.onnx import OnnxEncoder, export_onnx
from medret.models.pretrained import resolve_encoder, shipped


def files(data_dir: Path) -> list[str]:
    return [str(data_dir / "medmnist" / f) for f in ("breastmnist.npz", "pneumoniamnist.npz")]


def test_evaluate_cli_json_and_plots(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plots = tmp_path / "plots"
    code = main(
        ["evaluate", "pca-itq:16", "default", "pca-itq:16", "--data", *files(data_dir), "--plots", str(plots), "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queries"] == 78 + 504
    labels = [r["label"] for r in out["results"]]
    assert labels == ["pca-itq-16b", "default-48b", "pca-itq-16b-2"]  # one label, one plot each
    for r in out["results"]:
        assert set(r["hamming"]["per_organ"]) == {"breastmnist", "pneumoniamnist"}
        for key in ("mAP@10", "mAP@100", "mAP@1000", "P@10", "nDCG@100", "mAP@100 (organ)"):
            assert 0.0 <= r["hamming"]["micro"][key] <= 1.0
    # a trained encoder beats the training-free baseline on the strict metric
    assert out["results"][1]["hamming"]["macro"]["mAP@100"] > out["results"][0]["hamming"]["macro"]["mAP@100"]
    for name in (
        "pr.png",
        "map_at_k.png",
        "montage-default-48b.png",
        "montage-pca-itq-16b.png",
        "montage-pca-itq-16b-2.png",
    ):
        assert (plots / name).stat().st_size > 10_000
    curves = json.loads((plots / "curves.json").read_text())
    assert len(curves["default-48b"]["precision"]) == 49


def test_rerank_reports_both_rankings(data_dir: Path) -> None:
    split = split_from_files(files(data_dir))
    res = evaluate_encoder(resolve_encoder("default"), split, rerank=True)
    assert set(res) >= {"hamming", "reranked"}
    assert res["reranked"]["micro"]["mAP@100"] > 0.5


def test_pr_and_map_curves_agree_with_brute_force(data_dir: Path) -> None:
    split = split_from_files(files(data_dir)[:1])
    enc = resolve_encoder("pca-itq:16", split["train"].images)
    res = evaluate_encoder(enc, split)
    g, q = split["gallery"], split["query"]
    c = res["codes"]
    rel = (g.organ[None] == q.organ[:, None]) & (g.label[None] == q.label[:, None])
    prec, rec = pr_by_radius(c["query"], c["gallery"], lambda rows: rel[rows], 16, chunk=7)
    d = np.bitwise_count(c["query"][:, None] ^ c["gallery"][None]).sum(2)
    r = 5
    within = d <= r
    p_ref = np.mean([rel[i][within[i]].mean() if within[i].any() else 0.0 for i in range(len(q))])
    r_ref = np.mean([rel[i][within[i]].sum() / max(1, rel[i].sum()) for i in range(len(q))])
    assert prec[r] == pytest.approx(p_ref) and rec[r] == pytest.approx(r_ref)
    assert rec[16] == pytest.approx(1.0)
    curve = map_curve(c["ranked"], split, ks=(10, 100))
    assert curve["micro"] == pytest.approx([res["hamming"]["micro"]["mAP@10"], res["hamming"]["micro"]["mAP@100"]])


def test_default_encoder_is_shipped_with_its_config() -> None:
    assert "default-48" in shipped()
    enc = resolve_encoder("default")
    assert isinstance(enc, TorchHashEncoder)
    c = enc.config
    assert (c.name, c.method, c.bits, c.input_size, c.preprocess) == ("hashnet", "default", 48, (28, 28), "medmnist")
    assert len(c.weights_sha256) == 64


def test_onnx_codes_equal_torch_codes_on_real_images(data_dir: Path, tmp_path: Path) -> None:
    enc = resolve_encoder("default")
    assert isinstance(enc, TorchHashEncoder)
    split = split_from_files(files(data_dir))
    images = np.concatenate([split["query"].images, split["gallery"].images[:400]])
    path = export_onnx(enc, tmp_path / "default.onnx")
    onnx_enc = OnnxEncoder(path)
    assert onnx_enc.config == enc.config
    np.testing.assert_array_equal(onnx_enc.encode(images), enc.encode(images))
    np.testing.assert_allclose(onnx_enc.forward_features(images), enc.forward_features(images), atol=1e-4)


def test_the_query_paths_onnx_twin_gives_torch_codes_exactly(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medret.models.onnx as onnx_mod

    enc = resolve_encoder("default")
    assert isinstance(enc, TorchHashEncoder)
    split = split_from_files(files(data_dir))
    images = np.concatenate([split["query"].images, split["gallery"].images[:400]])
    twin = onnx_mod.CheckedOnnxEncoder.of(enc)
    codes, feats = twin.encode_with_features(images)
    want_codes, want_feats = enc.encode_with_features(images)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(feats, want_feats, atol=1e-4)
    np.testing.assert_array_equal(np.concatenate([twin.encode(images[i : i + 1]) for i in range(20)]), want_codes[:20])
    # a wide margin sends many images back to torch: their codes and features are torch's own
    monkeypatch.setattr(onnx_mod, "SIGN_MARGIN", 0.5)
    twin.rechecked = 0
    codes, feats = twin.encode_with_features(images)
    _, cont = enc._both(images)
    near = np.abs(cont).min(axis=1) < 0.5
    assert 0 < twin.rechecked == near.sum() < len(images)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(feats[near], want_feats[near])


def test_a_twin_that_differs_on_its_probe_is_refused_and_torch_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    import medret.models.onnx as onnx_mod
    from medret.serve.encoders import Encoders

    enc = resolve_encoder("default")
    assert isinstance(enc, TorchHashEncoder)
    assert isinstance(Encoders(runtime="onnx")._for_queries(enc), onnx_mod.CheckedOnnxEncoder)
    assert Encoders(runtime="torch")._for_queries(enc) is enc
    monkeypatch.setattr(onnx_mod, "PROBE_TOLERANCE", -1.0)  # no twin is close enough
    with pytest.raises(ValueError, match="ONNX Runtime differs from torch by"):
        onnx_mod.CheckedOnnxEncoder.of(enc)
    assert Encoders(runtime="onnx")._for_queries(enc) is enc


def test_encoder_rejects_wrong_image_size() -> None:
    from medret.errors import DataError

    with pytest.raises(DataError, match=r"takes 28x28 images with 1 channel\(s\) \(recipe 'medmnist'\), got 64x64"):
        resolve_encoder("default").encode(np.zeros((2, 64, 64), np.uint8))


def test_the_gallery_is_in_the_benchmarks_fixed_label_independent_order(data_dir: Path) -> None:
    shuffled = split_from_files(files(data_dir))
    by_class = split_from_files(files(data_dir), gallery_order="class")
    g, c = shuffled["gallery"], by_class["gallery"]
    perm = np.random.default_rng(12345).permutation(len(c))
    assert np.array_equal(g.images, c.images[perm]) and np.array_equal(g.label, c.label[perm])
    assert np.array_equal(g.organ, c.organ[perm]) and np.array_equal(g.source, c.source[perm])
    # the class order sorts each organ's gallery by class; the benchmark order does not
    assert all(np.all(np.diff(c.label[c.organ == o]) >= 0) for o in range(2))
    assert not np.all(np.diff(g.label[g.organ == 0]) >= 0)
    for part in ("train", "val", "query"):  # only the gallery moves
        assert np.array_equal(shuffled[part].source, by_class[part].source)


def test_evaluate_reports_the_tie_order_spread_and_the_class_order_on_request(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "pca-itq:16", "--data", *files(data_dir), "--json"]
    assert main([*args, "--order-spread", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gallery_order"] == "shuffled"
    r = out["results"][0]
    spread = r["order_spread"]
    assert spread["orders"] == 3 and spread["seeds"] == [12346, 12347, 12348]
    lo, hi = spread["micro mAP@100"]["min"], spread["micro mAP@100"]["max"]
    # 16-bit codes tie a lot: the other orders move the figure, the evaluated order sits among them
    assert lo < hi and lo - 0.05 < r["hamming"]["micro"]["mAP@100"] < hi + 0.05
    assert set(spread) >= {"breastmnist mAP@100", "pneumoniamnist mAP@100", "macro mAP@100"}
    assert main([*args, "--gallery-order", "class"]) == 0
    old = json.loads(capsys.readouterr().out)
    assert old["gallery_order"] == "class" and old["queries"] == out["queries"]
    assert old["results"][0]["hamming"]["micro"] != r["hamming"]["micro"]  # ties were decided by class


def test_a_colour_split_scores_grey_and_colour_encoders_each_in_its_own_channels(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RetinaMNIST kept in RGB: a grey encoder sees exactly the grey split's images (the same luma),
    a colour encoder the colour ones, and ``medret evaluate`` loads the split in colour when one needs it."""
    from medret.models.encoder import EncoderConfig
    from medret.models.hashnet import build_hashnet

    retina = [str(data_dir / "medmnist" / "retinamnist.npz")]
    grey, rgb = split_from_files(retina), split_from_files(retina, channels=3)
    assert rgb["gallery"].images.shape[1:] == (28, 28, 3) and grey["gallery"].images.ndim == 3
    default = resolve_encoder("default")
    on_grey, on_rgb = evaluate_encoder(default, grey), evaluate_encoder(default, rgb)
    assert np.array_equal(on_grey["codes"]["gallery"], on_rgb["codes"]["gallery"])
    assert on_grey["hamming"] == on_rgb["hamming"]

    config = EncoderConfig(
        name="hashnet", architecture="resnet", bits=16, channels=3, method="default", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    config = config.model_copy(update={"extra": {"arch": {"widths": [8, 16, 16, 16], "blocks": 1}}})
    colour = TorchHashEncoder.from_module(build_hashnet(config), config)
    colour.save(tmp_path / "colour.npz")
    # a colour encoder sees the colour: the RGB image and its grey copy in each channel differ to it
    feats = colour.forward_features(rgb["query"].images[:50])
    as_grey = colour.forward_features(np.repeat(grey["query"].images[:50, ..., None], 3, axis=3))
    assert np.abs(feats - as_grey).max() > 1e-3
    assert main(["evaluate", str(tmp_path / "colour.npz"), "default", "--data", *retina, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in out["results"]] == ["default-16b", "default-48b"]
    assert out["results"][1]["hamming"] == json.loads(json.dumps(on_grey["hamming"]))
