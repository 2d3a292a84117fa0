"""The encoders a table's codes were made with, loaded once each for the query path.

A table names its encoder (id and checkpoint) in its schema metadata; the query service
loads that checkpoint, or the configured fallback, and uses it only if its id is the
table's: a query is never encoded by a different model than the index.

A torch encoder answers through its ONNX Runtime twin (``encoder_runtime: onnx``, the default), which
is several times faster for the one or few images of a query and gives the same codes
(:class:`medret.models.onnx.CheckedOnnxEncoder`); where the twin cannot be built or does not match on
its probe images, the torch encoder answers itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from medret import observability as obs
from medret.errors import ConfigError, DataError, EncoderMismatchError
from medret.index.store import CodeIndex
from medret.models import rerank
from medret.models.encoder import Encoder

log = logging.getLogger(__name__)


class Encoders:
    """Encoders by id, loaded on first use from the table's checkpoint or ``fallback``. Thread-safe.

    ``runtime`` ``"onnx"``: torch encoders run through their checked ONNX Runtime twin on ``threads``
    threads; ``"torch"``: as loaded.
    """

    def __init__(self, fallback: str | None = None, *, runtime: str = "onnx", threads: int = 1) -> None:
        self.fallback = fallback
        self.runtime = runtime
        self.threads = threads
        self._lock = threading.RLock()
        self._loaded: dict[str, Encoder] = {}

    def get(self, idx: CodeIndex) -> Encoder:
        """The table's encoder, loaded once; its id must equal the table's."""
        with self._lock:
            enc = self._loaded.get(idx.encoder_id)
            if enc is not None:
                return enc
            from medret.models.encoder import load_encoder
            from medret.models.pretrained import encoder_path

            tried = []
            for spec in (idx.checkpoint, self.fallback):
                if not spec:
                    continue
                try:
                    candidate = load_encoder(encoder_path(spec))
                except (ConfigError, DataError) as err:
                    tried.append(f"{spec}: {err}")
                    continue
                if candidate.config.encoder_id == idx.encoder_id:
                    enc = self._loaded[idx.encoder_id] = self._for_queries(candidate)
                    obs.ENCODER_LOADED.labels(encoder_id=idx.encoder_id).set(1)
                    return enc
                tried.append(f"{spec}: is encoder {candidate.config.encoder_id}")
            raise EncoderMismatchError(
                f"table {idx.name!r} holds codes of encoder {idx.encoder_id}, and no checkpoint of it is reachable "
                f"here ({'; '.join(tried) or 'the table names none'}); pass the checkpoint with --checkpoint"
            )

    def _for_queries(self, encoder: Encoder) -> Encoder:
        """The encoder that answers queries: the torch encoder's checked ONNX twin where asked for and possible."""
        from medret.models.hashnet import TorchHashEncoder

        if self.runtime != "onnx" or not isinstance(encoder, TorchHashEncoder):
            return encoder
        from medret.models.onnx import CheckedOnnxEncoder

        try:
            twin = CheckedOnnxEncoder.of(encoder, threads=self.threads)
        except Exception as err:  # an operator the exporter or the runtime lacks: torch still answers, slower
            log.warning("encoder %s answers through torch: no ONNX Runtime twin (%s)", encoder.config.encoder_id, err)
            return encoder
        log.info("encoder %s answers through ONNX Runtime (%d thread(s))", encoder.config.encoder_id, self.threads)
        return twin

    def encode(self, idx: CodeIndex, images: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.uint8]:
        """Packed codes of prepared images, one model call, by the table's encoder."""
        return self.get(idx).encode(np.stack(images).astype(np.float32, copy=False))

    def encode_features(
        self, idx: CodeIndex, images: Sequence[npt.NDArray[np.float32]]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int8] | None]:
        """Packed codes and, where the table keeps them, compact features (for re-ranking): one model call."""
        x = np.stack(images).astype(np.float32, copy=False)
        if not idx.has_features:
            return self.get(idx).encode(x), None
        return rerank.codes_and_features(self.get(idx), x)
