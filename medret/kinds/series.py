"""``dicom-series``: the slice files of one folder, read together as the volume(s) of their series.

Only a route names this kind (MRI/CT stored a slice per file; see
:mod:`medret.pipelines.sources`). One folder may hold several series: each item id
carries its SeriesInstanceUID before the slice level (``#series=1.2.3&level=40``).
"""

from __future__ import annotations

import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

from medret import itemid
from medret.kinds.base import Item, Kind, Listing, ReadContext, Unit
from medret.storage.objects import ObjectStore

READ_AHEAD = 8  # slice GETs in flight


class DicomSeries(Kind):
    name = "dicom-series"
    description = "the DICOM slice files of one folder, read as the volume(s) of their series (by route only)"
    default_recipe = "mri-brain"
    recipe_input = "volume"
    whole_object = False
    item_keys = ("series",)
    listing = Listing.SERIES

    def read_items(self, ctx: ReadContext, unit: Unit) -> tuple[list[Item], int, float]:
        from medret.io.volume import read_dicom_series

        t0 = time.perf_counter()
        with ThreadPoolExecutor(READ_AHEAD) as pool:
            blobs = list(pool.map(ctx.store.read_bytes, unit.members))
        read_s = time.perf_counter() - t0
        sources = [(ctx.store.uri_of(k), b) for k, b in zip(unit.members, blobs, strict=True)]
        out = []
        for volume in read_dicom_series(sources, pixel_budget=ctx.pixel_budget):
            uid = volume.meta.get("series_uid", "")
            meta = {k: v for k, v in volume.meta.items() if k != "instance_uid"}  # the first slice's: not the item's
            for p in ctx.recipe(self.name)(volume, input_size=ctx.input_size):
                out.append(Item(itemid.nest(p.suffix, series=uid), p.image, {**meta, **p.meta}))
        return out, sum(len(b) for b in blobs), read_s

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        return self.read_items(ctx, unit)[0]

    def version(self, store: ObjectStore, key: str) -> str:
        """A folder has no etag of its own; its slices are listed when an item is read again."""
        return ""

    def unit_of_item(self, ctx: ReadContext, unit: Unit, suffix: str) -> Unit:
        """The folder's DICOM files now (the service does not know the routes that grouped them)."""
        if unit.members:
            return unit
        from medret import kinds

        folder = unit.key.rstrip("/")
        members = []
        for info in ctx.store.list(unit.key):
            if posixpath.dirname(info.key) != folder:
                continue
            try:
                found = kinds.detect(info.key, ctx.store.read_range(info.key, 0, kinds.HEAD_BYTES))
            except Exception:
                continue  # not an image at all: it was never one of the series' slices
            if found.name == kinds.get("dicom").name:
                members.append(info.key)
        return Unit(unit.uri, unit.key, unit.etag, unit.plan, tuple(sorted(members)))
