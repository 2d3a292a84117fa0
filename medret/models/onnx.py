"""ONNX export of a :class:`~medret.models.hashnet.TorchHashEncoder`, and an ONNX Runtime twin.

The graph takes ``images`` float32 (N, C, H, W) in [0, 1] (normalisation is inside the
graph) and returns ``code`` (N, bits) tanh values and ``features`` (N, F). The encoder's
config travels in the model's metadata (``medret.encoder_config``), so an exported file is as
self-describing as the ``.npz`` checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medret.models.codes import pack_bits
from medret.models.encoder import EncoderConfig
from medret.models.hashnet import HashNet, TorchHashEncoder, to_input

META_KEY = "medret.encoder_config"


def export_onnx(encoder: TorchHashEncoder, path: str | os.PathLike[str], *, opset: int = 17) -> Path:
    """Write the encoder as an ONNX graph (its config in the metadata) to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(onnx_bytes(encoder, opset=opset))
    return p


def onnx_bytes(encoder: TorchHashEncoder, *, opset: int = 17) -> bytes:
    """The encoder as a serialised ONNX graph, its config in the metadata (nothing written to disk)."""
    import io
    import warnings

    import onnx

    c = encoder.config
    example = torch.rand(2, c.channels, *c.input_size)
    module = _FullCode(encoder.module.cpu().eval()).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python branches
        torch.onnx.export(
            module,
            (example,),
            buf,  # type: ignore[arg-type]  # a file object is accepted (the stubs say a path)
            input_names=["images"],
            output_names=["features", "code"],
            dynamic_axes={"images": {0: "n"}, "features": {0: "n"}, "code": {0: "n"}},
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load_model_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, c.to_json()
    return bytes(model.SerializeToString())


class _FullCode(torch.nn.Module):
    """The exported graph: features and the full code (semantic + similarity bits)."""

    def __init__(self, net: HashNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_code(x)


class _FromRun:
    """The numpy encoder API over ``_run`` (images -> features and continuous codes, one pass)."""

    def _run(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        raise NotImplementedError

    def forward_features(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return self._run(images)[0]

    def forward_code(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return self._run(images)[1]

    def encode(self, images: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        return pack_bits(self.forward_code(images))

    def encode_with_features(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """Packed codes and features, one pass."""
        features, code = self._run(images)
        return pack_bits(code), features


class OnnxEncoder(_FromRun):
    """The same numpy API as the torch encoder, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | os.PathLike[str] | bytes, *, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            # threads that sleep between calls: a busy-waiting pool takes cores the service's other work needs
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = EncoderConfig.from_json(meta[META_KEY])

    def _run(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        x = to_input(images, self.config).numpy()
        features, code = self.session.run(["features", "code"], {"images": x})
        return features, code


#: a continuous code value at least this far from 0 has the same sign in ONNX Runtime as in torch (their
#: float results differ by ~1e-6 on medret's encoders; :class:`CheckedOnnxEncoder` checks 1e-4 at load)
SIGN_MARGIN = 1e-3
#: what the two runtimes may differ by on the probe images before the ONNX twin is refused: continuous
#: codes absolutely (a tenth of :data:`SIGN_MARGIN`), features relative to their largest magnitude
PROBE_TOLERANCE = 1e-4


class CheckedOnnxEncoder(_FromRun):
    """A torch encoder's ONNX Runtime twin that gives exactly the torch encoder's codes.

    ONNX Runtime runs a small encoder several times faster than eager torch for one image (the query
    path's case), but its floats differ from torch's in the last bits. A code bit is the sign of a
    continuous value, so only values within :data:`SIGN_MARGIN` of zero could flip: an image with any
    such value is encoded again by torch. The twin is built in memory and checked on probe images at
    construction (:meth:`of`); features (for re-ranking) are the runtime's, within float error of torch's.
    """

    def __init__(self, torch_encoder: TorchHashEncoder, onnx_encoder: OnnxEncoder) -> None:
        self.torch = torch_encoder
        self.onnx = onnx_encoder
        self.config = torch_encoder.config
        self.rechecked = 0  # images encoded again by torch (a value near 0)

    @classmethod
    def of(cls, encoder: TorchHashEncoder, *, threads: int = 1, seed: int = 0) -> CheckedOnnxEncoder:
        """Export ``encoder`` in memory and check the twin on random probe images: ValueError where it differs."""
        twin = cls(encoder, OnnxEncoder(onnx_bytes(encoder), threads=threads))
        c = encoder.config
        shape = (8, *c.input_size) if c.channels == 1 else (8, *c.input_size, c.channels)
        probe = np.random.default_rng(seed).random(shape, dtype=np.float32)
        (tf, tc), (of, oc) = encoder._both(probe), twin.onnx._run(probe)
        code_gap = float(np.abs(tc - oc).max(initial=0.0))
        feature_gap = float(np.abs(tf - of).max(initial=0.0)) / max(1.0, float(np.abs(tf).max(initial=0.0)))
        worst = max(code_gap, feature_gap)
        if not worst <= PROBE_TOLERANCE:
            raise ValueError(f"{c.name}: ONNX Runtime differs from torch by {worst:.3g} on probe images")
        return twin

    def _run(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        features, code = self.onnx._run(images)
        near = np.abs(code).min(axis=1, initial=np.inf) < SIGN_MARGIN
        if near.any():
            self.rechecked += int(near.sum())
            tf, tc = self.torch._both(np.asarray(images)[near])
            features, code = features.copy(), code.copy()
            features[near], code[near] = tf, tc
        return features, code

    def save(self, path: str | os.PathLike[str]) -> EncoderConfig:
        """The torch encoder's checkpoint (the twin is made again from it)."""
        return self.torch.save(path)
