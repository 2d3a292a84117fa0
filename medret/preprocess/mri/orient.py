"""Step 1: reorient a volume so its array axes follow a canonical orientation code."""

from __future__ import annotations

from medret.errors import ConfigError
from medret.io.volume import Volume

_AXES = ({"L", "R"}, {"P", "A"}, {"S", "I"})


def reorient(vol: Volume, code: str = "LPS") -> Volume:
    """Permute/flip the array (no resampling) so axes run along ``code`` (e.g. ``LPS``, ``RAS``).

    World coordinates are unchanged; only the voxel grid's layout is.
    """
    import SimpleITK as sitk

    code = code.upper()
    if len(code) != 3 or sorted(map(_axis_of, code)) != [0, 1, 2]:
        raise ConfigError(f"orientation must be three letters naming each of L/R, P/A, S/I once, got {code!r}")
    out = sitk.DICOMOrient(vol.to_sitk(), code)
    return Volume.from_sitk(out, {**vol.meta, "orientation": code})


def _axis_of(letter: str) -> int:
    for i, pair in enumerate(_AXES):
        if letter in pair:
            return i
    return -1
