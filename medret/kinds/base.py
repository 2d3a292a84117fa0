"""What one kind of file is to medret, in one class: how it is recognised, read, expanded and shown.

A :class:`Kind` answers every question the indexing job, the query service, ``medret
inspect`` and training ask of a file: does this name or content belong to me
(:meth:`Kind.recognise`), into what units does one object split (:meth:`Kind.plan`),
what model inputs does a unit hold (:meth:`Kind.items`), what does an upload of me
become (:meth:`Kind.upload`), what does an item look like (:meth:`Kind.render`), and
what does ``medret inspect`` say about me (:meth:`Kind.describe`). Register one with
:func:`medret.kinds.register`, or from another package through the ``medret.kinds``
entry-point group (``docs/kinds.md``).
"""

from __future__ import annotations

import enum
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, DataError
from medret.io.base import DEFAULT_PIXEL_BUDGET
from medret.preprocess.recipes import RECIPES, Prepared, Recipe, takes_option
from medret.preprocess.wsi.tiling import TilingConfig
from medret.storage.objects import ObjectStore


@dataclass(frozen=True)
class ReadContext:
    """What reading and preparing an object needs; pickled into the job's Ray tasks.

    ``recipes`` maps kind -> recipe name exactly as recorded in the code table, so the job
    and the service run the same function for each kind. ``channels`` is the encoder's
    (``EncoderConfig.channels``): 1 makes (H, W) grey inputs, 3 makes (H, W, 3) RGB.
    """

    store: ObjectStore | Any  # None for an upload, which reads nothing from a store
    input_size: tuple[int, int]
    recipes: dict[str, str]
    tiling: TilingConfig
    cache_dir: str = ""
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    channels: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one model input: (H, W) grey, or (H, W, C)."""
        return self.input_size if self.channels == 1 else (*self.input_size, self.channels)

    def recipe(self, kind: str) -> Recipe:
        """The kind's recorded recipe, given this context's ``channels`` when it takes them.

        A recipe without a ``channels`` keyword makes grey inputs only: asked for by a colour
        encoder, it is refused here, naming the recipe and the kind.
        """
        if kind not in self.recipes:
            raise ConfigError(f"no preprocessing recipe recorded for kind {kind!r} (have {sorted(self.recipes)})")
        name = self.recipes[kind]
        fn = RECIPES.get(name)
        if takes_option(fn, "channels"):
            return functools.partial(fn, channels=self.channels)
        if self.channels != 1:
            raise ConfigError(
                f"recipe {name!r} (kind {kind}) makes grey inputs only, but this encoder takes {self.channels} "
                f"channels; index {kind} objects into a table of a 1-channel encoder"
            )
        return fn

    def sized(self, input_size: tuple[int, int]) -> ReadContext:
        return replace(self, input_size=input_size)


@dataclass
class Item:
    """One model input of an object: its item-id suffix, the image, and what to record about it."""

    suffix: str
    image: npt.NDArray[np.float32]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, prepared: Sequence[Prepared], meta: dict[str, Any] | None = None) -> list[Item]:
        return [cls(p.suffix, p.image, {**(meta or {}), **p.meta}) for p in prepared]


@dataclass(frozen=True)
class Unit:
    """What one read task gets of an object: where it is, and its share of the object's plan."""

    uri: str  # the object's URI (item ids start with it)
    key: str = ""  # its key in the store ("" for an upload)
    etag: str = ""
    plan: str = ""  # the kind's own JSON: a slide unit's tile positions
    members: tuple[str, ...] = ()  # a series folder's slice files

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> Unit:
        members = row.get("members") or ""
        return cls(
            str(row["uri"]),
            str(row.get("key", "")),
            str(row.get("etag", "")),
            str(row.get("plan", "") or ""),
            tuple(json.loads(members)) if isinstance(members, str) and members else tuple(members or ()),
        )


class Listing(enum.Enum):
    """What the source listing does with an object routed to a kind."""

    OBJECT = "object"  # index it
    SERIES = "series"  # the routed files of one folder are one object
    SIDECAR = "sidecar"  # a CSV of metadata for the objects it names
    SKIP = "skip"  # leave it out
    DETECT = "detect"  # decide the kind from the content (the default route)


class Kind:
    """One kind of file. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: key globs that route an object to this kind by default (``IndexJobConfig.routes`` come first)
    patterns: ClassVar[tuple[str, ...]] = ()
    #: file endings this kind claims: content that is not this kind under such a name is a corrupt file
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: the preprocessing recipe by default; None: the encoder's own (``EncoderConfig.preprocess``)
    default_recipe: ClassVar[str | None] = None
    #: what its recipe takes ("image", "volume" or "tiles": ``medret.preprocess.recipes.RECIPE_INPUTS``)
    recipe_input: ClassVar[str] = "image"
    #: detection order (lower first); :meth:`recognise_weak` is asked only after every kind's :meth:`recognise`
    order: ClassVar[int] = 50
    #: the job fetches the whole object for :meth:`items` (False: the kind reads it itself, by path or members)
    whole_object: ClassVar[bool] = True
    #: item-id suffix keys only this kind writes first (``#x=``: a slide tile), so an item says its kind
    item_keys: ClassVar[tuple[str, ...]] = ()
    #: the name an upload asks for (the ``kind`` field of a search); None: cannot be a query
    query_mode: ClassVar[str | None] = None
    #: kinds of uploaded file that query mode takes (default: this kind's own files)
    query_files: ClassVar[tuple[str, ...]] = ()
    #: how a chosen item of a multi-item upload is called ("frame", "slice")
    query_choice: ClassVar[str] = "frame"
    #: preparing an upload is expensive (registration): the service runs it on its few heavy workers
    heavy: ClassVar[bool] = False
    #: its items are slide tiles (counted as tiles in the job summary)
    tiles: ClassVar[bool] = False
    #: what the source listing does with objects routed here
    listing: ClassVar[Listing] = Listing.OBJECT
    #: a route may name it (False: a provisional kind that detection alone yields and resolves)
    routable: ClassVar[bool] = True

    # -- recognition -------------------------------------------------------------------
    def recognise(self, name: str, head: bytes) -> bool:
        """Whether ``head`` (the first :data:`HEAD_BYTES` bytes) under ``name`` is this kind's."""
        return False

    def recognise_weak(self, name: str, head: bytes) -> bool:
        """A fallback test tried after every kind's :meth:`recognise` (magic-less formats)."""
        return False

    def needs_file(self) -> bool:
        """Whether :meth:`resolve` must look at the whole file to settle what it is."""
        return False

    def resolve(self, path: Path) -> Kind:
        """The kind this file really is (a TIFF: a slide or a flat image)."""
        return self

    def as_upload(self) -> Kind:
        """The kind an uploaded file of this kind is read as (an uploaded TIFF is an image)."""
        return self

    # -- reading -----------------------------------------------------------------------
    def plan(self, ctx: ReadContext, unit: Unit) -> list[str]:
        """The units one object splits into, as plans; one unit by default."""
        return [""]

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        """The model inputs of one unit, preprocessed by the kind's recorded recipe."""
        raise NotImplementedError(f"kind {self.name!r} reads nothing")

    def read_items(self, ctx: ReadContext, unit: Unit) -> tuple[list[Item], int, float]:
        """:meth:`items` of a unit this kind reads itself: the items, bytes read and seconds spent reading."""
        t0 = time.perf_counter()
        data = ctx.store.read_bytes(unit.key)
        read_s = time.perf_counter() - t0
        return self.items(ctx, unit, data), len(data), read_s

    def version(self, store: ObjectStore, key: str) -> str:
        """The object's version tag now (its etag), to read it again; a kind whose object is no single
        stored object (a series folder) says what stands for it."""
        return store.info(key).etag

    def unit_of_item(self, ctx: ReadContext, unit: Unit, suffix: str) -> Unit:
        """The unit that holds one item (a slide tile's position), to read it again alone."""
        return unit

    def item(self, ctx: ReadContext, unit: Unit, suffix: str, data: bytes | None) -> Item:
        """One item of an object, rebuilt from its item-id suffix."""
        unit = self.unit_of_item(ctx, unit, suffix)
        if data is None and self.whole_object:
            data = ctx.store.read_bytes(unit.key)
        found = [it for it in self.items(ctx, unit, data) if it.suffix == suffix]
        if not found:
            raise DataError(f"{unit.uri}: holds no item {suffix or '(whole object)'!r} now")
        return found[0]

    # -- queries and thumbnails --------------------------------------------------------
    def upload(
        self, ctx: ReadContext, data: bytes, name: str, *, choice: int | None = None, mpp: float | None = None
    ) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        """An uploaded file -> the query image, prepared as the index prepared this kind, and what was chosen."""
        items = self.items(ctx, Unit(name), data)
        if not items:
            raise DataError(f"{name}: preprocessing produced no image")
        if choice is None:
            index = len(items) // 2 if self.query_choice == "slice" else 0
        elif not 0 <= choice < len(items):
            raise ConfigError(
                f"{name}: {self.query_choice} {choice} is out of range; this input has {len(items)} (0-based)"
            )
        else:
            index = choice
        chosen = items[index]
        if self.query_choice == "slice":  # a volume's slices are named by their level in template space
            meta: dict[str, Any] = {"slice": chosen.suffix.lstrip("#")}
        else:
            meta = {self.query_choice: index} if len(items) > 1 else {}
        return chosen.image, meta

    def render(self, ctx: ReadContext, unit: Unit, suffix: str) -> npt.NDArray[Any]:
        """An item's thumbnail (``ctx.input_size`` is the thumbnail size): the item as the encoder saw it."""
        data = ctx.store.read_bytes(unit.key) if self.whole_object else None
        return self.item(ctx, unit, suffix, data).image

    # -- medret inspect ----------------------------------------------------------------
    def describe(self, path: Path, label: str, **options: Any) -> dict[str, Any]:
        """What ``medret inspect`` shows: the decoded file's geometry, reader and metadata."""
        return {}

    def __repr__(self) -> str:
        return f"<kind {self.name}>"


def stats(arr: npt.NDArray[Any]) -> dict[str, Any]:
    """Shape, dtype and value range of an array, for :meth:`Kind.describe`."""
    return {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "min": float(np.min(arr)),
        "max": float(np.max(arr)),
        "mean": round(float(np.mean(arr)), 4),
    }
