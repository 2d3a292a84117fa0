"""Route-only kinds: ``auto`` (decide from the content), ``sidecar`` (metadata CSVs) and ``skip``."""

from __future__ import annotations

from medret.kinds.base import Kind, Listing


class Auto(Kind):
    name = "auto"
    description = "decided per object from its content (the default for keys no route names)"
    listing = Listing.DETECT


class Sidecar(Kind):
    name = "sidecar"
    description = "a CSV with a path column whose other columns become the named objects' metadata"
    patterns = ("*.csv",)
    listing = Listing.SIDECAR


class Skip(Kind):
    name = "skip"
    description = "left out of the index"
    listing = Listing.SKIP
