"""``raster``: PNG, JPEG, BMP, GIF and flat TIFF images (Pillow, tifffile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.kinds.base import Item, Kind, ReadContext, Unit
from medret.kinds.describe import decoded_summary

MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF8")


class Raster(Kind):
    name = "raster"
    description = "PNG / JPEG / BMP / GIF / flat TIFF image, preprocessed by the encoder's own recipe"
    patterns = ("*.png", "*.jpg", "*.jpeg", "*.bmp")
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
    order = 30
    query_mode = "image"

    def recognise(self, name: str, head: bytes) -> bool:
        return head.startswith(MAGIC)

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        from medret.io.raster import read_raster

        decoded = read_raster(data if data is not None else b"", name=unit.uri, pixel_budget=ctx.pixel_budget)
        return Item.of(ctx.recipe(self.name)(decoded, input_size=ctx.input_size), decoded.meta)

    def render(self, ctx: ReadContext, unit: Unit, suffix: str) -> npt.NDArray[Any]:
        """Colour images in colour (scaled down to the thumbnail size), the rest as the encoder saw them."""
        from medret.io.raster import read_raster
        from medret.io.wsi import resize_rgb

        data = ctx.store.read_bytes(unit.key)
        frame = np.asarray(read_raster(data, name=unit.uri, pixel_budget=ctx.pixel_budget).frame(0))
        if frame.ndim == 3 and frame.dtype == np.uint8:
            h, w = frame.shape[:2]
            scale = min(ctx.input_size[0] / h, ctx.input_size[1] / w, 1.0)
            return resize_rgb(frame, (max(1, round(w * scale)), max(1, round(h * scale))))
        return self.item(ctx, unit, suffix, data).image

    def describe(self, path: Path, label: str, **options: Any) -> dict[str, Any]:
        from medret.io.raster import read_raster

        return decoded_summary(read_raster(path, name=label, pixel_budget=options["pixel_budget"]))
