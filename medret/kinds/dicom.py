"""``dicom``: one DICOM instance (X-ray, a multi-frame object), windowed by the ``xray`` recipe."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from medret.kinds.base import Item, Kind, ReadContext, Unit
from medret.kinds.describe import decoded_summary

#: first group numbers of ACR-NEMA / preamble-less DICOM files
_BARE_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}


class Dicom(Kind):
    name = "dicom"
    description = "a DICOM instance (X-ray, multi-frame), windowed by its VOI LUT or window"
    patterns = ("*.dcm", "*.dicom")
    suffixes = (".dcm", ".dicom")
    default_recipe = "xray"
    order = 10
    query_mode = "dicom"

    def recognise(self, name: str, head: bytes) -> bool:
        return head[128:132] == b"DICM"

    def recognise_weak(self, name: str, head: bytes) -> bool:
        """ACR-NEMA / no-preamble DICOM: starts with a little- or big-endian group number we know."""
        if PurePosixPath(name.lower()).suffix not in {".dcm", ".dicom", ""} or len(head) < 8:
            return False
        return int.from_bytes(head[:2], "little") in _BARE_GROUPS or int.from_bytes(head[:2], "big") in _BARE_GROUPS

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        from medret.io.dicom import read_dicom

        decoded = read_dicom(data if data is not None else b"", name=unit.uri, pixel_budget=ctx.pixel_budget)
        return Item.of(ctx.recipe(self.name)(decoded, input_size=ctx.input_size), decoded.meta)

    def describe(self, path: Path, label: str, **options: Any) -> dict[str, Any]:
        from medret import kinds
        from medret.io.dicom import WSI_SOP_CLASS, parse_dicom, read_dicom

        raw = path.read_bytes()  # read once: the header check and the decode share it
        header = parse_dicom(raw, label, stop_before_pixels=True)
        if str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS:  # a slide stored as DICOM
            return {"kind": kinds.get("wsi").name, **kinds.get("wsi").describe(path, label, **options)}
        return decoded_summary(read_dicom(raw, name=label, pixel_budget=options["pixel_budget"]))
