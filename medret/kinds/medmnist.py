"""``medmnist``: a MedMNIST-style ``.npz`` set; every image of every split is one item."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import itemid
from medret.io.base import Decoded
from medret.kinds.base import Item, Kind, ReadContext, Unit, stats

_SETS: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (uri, etag) -> decoded set, a few per process


class MedMNIST(Kind):
    name = "medmnist"
    description = "a MedMNIST .npz set ({train,val,test}_{images,labels}); one input per image"
    patterns = ("*.npz",)
    suffixes = (".npz",)
    order = 50
    item_keys = ("split",)

    def recognise(self, name: str, head: bytes) -> bool:
        return head.startswith(b"PK\x03\x04") and PurePosixPath(name.lower()).suffix == ".npz"

    def _set(self, unit: Unit, data: bytes) -> Any:
        from medret.io.medmnist import read_medmnist

        key = (unit.uri, unit.etag)
        if unit.etag and key in _SETS:
            _SETS.move_to_end(key)
            return _SETS[key]
        m = read_medmnist(data, name=unit.uri)
        if unit.etag:
            _SETS[key] = m
            while len(_SETS) > 4:
                _SETS.popitem(last=False)
        return m

    def _prepare(self, ctx: ReadContext, image: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        (p,) = ctx.recipe(self.name)(Decoded(image, kind=self.name, reader="numpy"), input_size=ctx.input_size)
        return p.image

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        m = self._set(unit, data if data is not None else b"")
        counters: dict[str, int] = {}
        out = []
        for image, lab, split in zip(m.images, m.labels, m.split, strict=True):
            i = counters[str(split)] = counters.get(str(split), -1) + 1
            meta = {"label": str(int(lab)), "split": str(split)}
            out.append(Item(itemid.suffix(split=split, i=i), self._prepare(ctx, image), meta))
        return out

    def _image(self, ctx: ReadContext, unit: Unit, suffix: str, data: bytes | None) -> tuple[Any, int]:
        parts = itemid.parse(suffix)
        m = self._set(unit, data if data is not None else ctx.store.read_bytes(unit.key))
        images = m.images[np.asarray(m.split) == parts["split"]]
        return images[int(parts["i"])], int(m.labels[np.asarray(m.split) == parts["split"]][int(parts["i"])])

    def item(self, ctx: ReadContext, unit: Unit, suffix: str, data: bytes | None) -> Item:
        image, label = self._image(ctx, unit, suffix, data)
        return Item(suffix, self._prepare(ctx, image), {"label": str(label), "split": itemid.parse(suffix)["split"]})

    def render(self, ctx: ReadContext, unit: Unit, suffix: str) -> npt.NDArray[Any]:
        """The stored image itself (MedMNIST images are already thumbnail-sized)."""
        key = (unit.uri, unit.etag)
        data = None if unit.etag and key in _SETS else ctx.store.read_bytes(unit.key)
        return np.asarray(self._image(ctx, unit, suffix, data)[0])

    def describe(self, path: Path, label: str, **options: Any) -> dict[str, Any]:
        from medret.io.medmnist import read_medmnist

        m = read_medmnist(path)
        return {"reader": "numpy", **stats(m.images), "labels": sorted({int(v) for v in np.unique(m.labels)})}
