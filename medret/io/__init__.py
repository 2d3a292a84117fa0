"""Readers: bytes -> pixel arrays + metadata. They decode; they never normalise.

Importing this package registers every reader in :data:`medret.io.base.READERS`
(heavy decoders are imported inside the readers, on first use).
"""

from medret.io import dicom, raster, volume, wsi  # noqa: F401  (registers the readers)
