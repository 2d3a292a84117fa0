"""The kind registry: every kind of file medret reads, and the one dispatch the job, service and CLI share.

Built-in kinds (:mod:`medret.kinds.builtin`) register on first use; kinds from other
packages come in through the ``medret.kinds`` entry-point group (``docs/kinds.md``):

.. code-block:: toml

    [project.entry-points."medret.kinds"]
    npy = "medret_npy:NpyKind"

Everything else asks this module: which kinds exist (:func:`names`), what a file is
(:func:`detect`), which kind a route names (:func:`get`), which kind wrote an item
(:func:`for_item`), which kind an upload mode means (:func:`for_query`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import PurePosixPath

from medret.errors import ConfigError, CorruptFileError, EmptyFileError, UnknownNameError, UnsupportedFormatError
from medret.kinds.base import Item, Kind, Listing, ReadContext, Unit, stats
from medret.storage.objects import ObjectStore

__all__ = [
    "ENTRY_POINT_GROUP",
    "HEAD_BYTES",
    "Item",
    "Kind",
    "Listing",
    "ReadContext",
    "Unit",
    "default_recipes",
    "default_routes",
    "detect",
    "for_item",
    "for_query",
    "get",
    "indexed",
    "names",
    "of_item",
    "query_modes",
    "register",
    "reload",
    "stats",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "medret.kinds"
#: how many leading bytes :func:`detect` wants (DICOM's magic sits at offset 128, NIfTI's at 344)
HEAD_BYTES = 352
#: the upload mode that takes whatever the file is
AUTO_QUERY = "auto"

_KINDS: dict[str, Kind] = {}
_lock = threading.RLock()
_loaded = False


def register(kind: Kind | type[Kind]) -> Kind:
    """Add a kind (a :class:`Kind` subclass or instance); its name must be new."""
    obj = kind() if isinstance(kind, type) else kind
    if not isinstance(obj, Kind) or not obj.name:
        raise TypeError(f"{kind!r} is not a medret Kind with a name")
    with _lock:
        if obj.name in _KINDS and type(_KINDS[obj.name]) is not type(obj):
            raise ValueError(f"kind {obj.name!r} is already registered by {type(_KINDS[obj.name]).__module__}")
        _KINDS[obj.name] = obj
    return obj


def _load() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        from medret.kinds import builtin

        for k in builtin.KINDS:
            register(k)
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                obj = ep.load()
                register(obj)
            except Exception as err:
                raise UnknownNameError(
                    f"the kind {ep.name!r} from entry point {ep.value!r} (group {ENTRY_POINT_GROUP}) "
                    f"cannot be loaded: {type(err).__name__}: {err}"
                ) from err
            log.debug("kind %s from %s", ep.name, ep.value)
        _loaded = True


def reload() -> None:
    """Read the entry points again (a plugin installed or put on ``sys.path`` in a running process)."""
    global _loaded
    with _lock:
        _KINDS.clear()
        _loaded = False
    _load()


def all_kinds() -> Iterator[Kind]:
    _load()
    return iter(list(_KINDS.values()))


def get(name: str) -> Kind:
    """The kind called ``name``."""
    _load()
    try:
        return _KINDS[name]
    except KeyError:
        raise UnknownNameError(f"unknown kind {name!r}; known: {', '.join(names())}") from None


def names(*listings: Listing) -> list[str]:
    """Kinds a route may name (all but provisional ones), or those with the given listings."""
    return [k.name for k in all_kinds() if k.routable and (not listings or k.listing in listings)]


def indexed() -> list[Kind]:
    """The kinds whose objects get items (and so a recipe)."""
    return [k for k in all_kinds() if k.routable and k.listing in (Listing.OBJECT, Listing.SERIES)]


def default_routes() -> list[tuple[str, str]]:
    """``(pattern, kind)`` for every built-in pattern, in registration order."""
    return [(p, k.name) for k in all_kinds() for p in k.patterns]


def default_recipes(encoder_recipe: str) -> dict[str, str]:
    """Kind -> recipe: each kind's own default, the encoder's recipe for kinds without one where it
    takes what they give (images), else ``medmnist``, the plain image recipe (an encoder made for
    slide tiles reads a tile saved as PNG that way: letterboxed, in its colour)."""
    from medret.preprocess.recipes import RECIPE_INPUTS

    def fallback(k: Kind) -> str:
        return encoder_recipe if RECIPE_INPUTS.get(encoder_recipe, "image") == k.recipe_input else "medmnist"

    return {k.name: k.default_recipe or fallback(k) for k in indexed()}


def auto() -> Kind:
    """The kind objects get when no route names one: decide from the content."""
    return next(k for k in all_kinds() if k.listing is Listing.DETECT)


def query_modes() -> list[str]:
    """What a search may ask an upload to be read as: ``auto`` and each kind's query mode."""
    return [AUTO_QUERY, *(k.query_mode for k in all_kinds() if k.query_mode)]


def for_query(mode: str) -> Kind | None:
    """The kind an upload mode names (None for ``auto``)."""
    if mode == AUTO_QUERY:
        return None
    for k in all_kinds():
        if k.query_mode == mode:
            return k
    raise ConfigError(f"kind must be one of {', '.join(query_modes())}, got {mode[:40]!r}")


def for_item(suffix: str) -> Kind | None:
    """The kind whose items carry this item-id suffix, when the suffix says (``#x=``: a slide tile)."""
    from medret import itemid

    parts = itemid.parse(suffix)
    if not parts:
        return None
    first = next(iter(parts))
    return next((k for k in all_kinds() if first in k.item_keys), None)


def detect(name: str, head: bytes) -> Kind:
    """The kind of a file from its first bytes first and its name second; raises for anything else.

    Content wins over the extension: a PNG saved as ``.dcm`` is read as a PNG. A kind whose
    :meth:`Kind.needs_file` is true (a plain TIFF) is settled by :meth:`Kind.resolve`.

    >>> detect("x.dcm", b"\\x89PNG\\r\\n\\x1a\\n" + bytes(200)).name
    'raster'
    >>> detect("scan.nii.gz", b"\\x1f\\x8b" + bytes(200)).name
    'nifti'
    >>> detect("slide.svs", b"II*\\x00" + bytes(200)).name, detect("flat.tif", b"II*\\x00" + bytes(200)).name
    ('wsi', 'tiff')
    >>> detect("notes.txt", b"hello")
    Traceback (most recent call last):
    ...
    medret.errors.UnsupportedFormatError: notes.txt: no reader for this file (extension '.txt', first bytes 68656c6c6f)
    """
    if not head:
        raise EmptyFileError(name, "file is empty (0 bytes)")
    ordered = sorted(all_kinds(), key=lambda k: k.order)
    for test in ("recognise", "recognise_weak"):
        for k in ordered:
            if getattr(k, test)(name, head):
                return k
    low = PurePosixPath(name.lower())
    last, both = low.suffix, "".join(low.suffixes[-2:])
    claimed = {s for k in ordered for s in k.suffixes}
    if last in claimed or both in claimed:
        raise CorruptFileError(
            name, f"named like a {both or last} file, but its content is not one (first bytes {head[:8].hex()})"
        )
    raise UnsupportedFormatError(name, f"no reader for this file (extension {last!r}, first bytes {head[:8].hex()})")


def recipes_for(encoder_recipe: str, chosen: dict[str, str] | None = None) -> dict[str, str]:
    """Kind -> recipe for a job: the defaults, with ``chosen`` (``IndexJobConfig.recipes``) checked and applied."""
    from medret.preprocess.recipes import RECIPE_INPUTS, RECIPES

    out = default_recipes(encoder_recipe)
    for name, recipe in (chosen or {}).items():
        if name not in out:
            raise ConfigError(f"recipes.{name}: no kind {name!r} takes a recipe; kinds that do: {', '.join(out)}")
        if recipe not in RECIPES:
            raise ConfigError(f"recipes.{name}: unknown preprocessing recipe {recipe!r}; known: {', '.join(RECIPES)}")
        takes, gives = RECIPE_INPUTS.get(recipe, "image"), get(name).recipe_input
        if takes != gives:
            raise ConfigError(
                f"recipes.{name}: recipe {recipe!r} takes {takes} input, but {name} objects give {gives}; "
                f"recipes that take {gives}: {', '.join(r for r in RECIPES if RECIPE_INPUTS.get(r, 'image') == gives)}"
            )
        out[name] = recipe
    return out


def for_upload(mode: str, name: str, head: bytes) -> Kind:
    """The kind that prepares an upload asked to be read as ``mode``, after checking the file is one it takes."""
    detected = detect(name, head).as_upload()
    wanted = for_query(mode)
    if wanted is None:  # the file's own kind, if files of it can be queries (a whole slide cannot: only a tile)
        if detected.query_mode is None or detected.name not in (detected.query_files or (detected.name,)):
            modes = ", ".join(m for m in query_modes() if m != AUTO_QUERY)
            raise UnsupportedFormatError(
                name,
                f"a {detected.name} file cannot be uploaded as a query (upload kinds: {modes}); upload a region "
                "of a slide as a PNG/JPEG tile (kind=tile), or search by an indexed item",
            )
        return detected
    takes = wanted.query_files or (wanted.name,)
    if detected.name not in takes:
        raise UnsupportedFormatError(
            name, f"kind={mode} needs a {' or '.join(takes)} file, but this is a {detected.name} file"
        )
    return wanted


def of_item(store: ObjectStore, key: str, source: str, suffix: str, etag: str = "", cache_dir: str = "") -> Kind:
    """The kind of an indexed item: said by its suffix (``#x=``: a slide tile), else by its object's content."""
    kind = for_item(suffix)
    if kind is not None:
        return kind
    from medret.storage.cache import local_copy

    kind = detect(source, store.read_range(key, 0, HEAD_BYTES))
    if kind.needs_file():
        kind = kind.resolve(local_copy(store, key, etag, cache_dir))
    return kind
