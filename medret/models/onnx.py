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
    import onnx

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    c = encoder.config
    example = torch.rand(2, c.channels, *c.input_size)
    module = _FullCode(encoder.module.cpu().eval()).eval()
    torch.onnx.export(
        module,
        (example,),
        str(p),
        input_names=["images"],
        output_names=["features", "code"],
        dynamic_axes={"images": {0: "n"}, "features": {0: "n"}, "code": {0: "n"}},
        opset_version=opset,
        dynamo=False,
    )
    model = onnx.load(str(p))
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, c.to_json()
    onnx.save(model, str(p))
    return p


class _FullCode(torch.nn.Module):
    """The exported graph: features and the full code (semantic + similarity bits)."""

    def __init__(self, net: HashNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_code(x)


class OnnxEncoder:
    """The same numpy API as the torch encoder, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = EncoderConfig.from_json(meta[META_KEY])

    def _run(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        x = to_input(images, self.config).numpy()
        features, code = self.session.run(["features", "code"], {"images": x})
        return features, code

    def forward_features(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return self._run(images)[0]

    def forward_code(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return self._run(images)[1]

    def encode(self, images: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        return pack_bits(self.forward_code(images))

    def encode_with_features(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """Packed codes and backbone features, one session run."""
        features, code = self._run(images)
        return pack_bits(code), features
