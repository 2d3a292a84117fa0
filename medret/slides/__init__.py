"""Whole-slide search: a slide as a bag (mosaic) of tile codes, and exact bag-to-bag Hamming matching.

:mod:`medret.slides.mosaic` picks a slide's representative tiles; :mod:`medret.slides.match`
holds the bags of a gallery of slides and ranks them against a query bag.
"""

from medret.slides.match import (
    BagGallery,
    SlideHit,
    best_tiles,
    candidates,
    majority_code,
    median_min,
    prefilter,
    rank,
    search,
    symmetric,
    top_median_min,
    vote,
)
from medret.slides.mosaic import MosaicConfig, select_mosaic

__all__ = [
    "BagGallery",
    "MosaicConfig",
    "SlideHit",
    "best_tiles",
    "candidates",
    "majority_code",
    "median_min",
    "prefilter",
    "rank",
    "search",
    "select_mosaic",
    "symmetric",
    "top_median_min",
    "vote",
]
