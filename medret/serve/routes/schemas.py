"""The API's response bodies (errors: :class:`medret.serve.guard.Problem`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Hit(BaseModel):
    rank: int
    item_id: str
    distance: int
    source_uri: str
    thumbnail_url: str
    similar_url: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    table: str
    encoder_id: str
    k: int
    query: dict[str, Any]
    results: list[Hit]
    timings_ms: dict[str, float]


class TableInfo(BaseModel):
    name: str
    rows: int
    version: int
    encoder_id: str
    encoder: dict[str, Any]
    recipes: dict[str, Any]
    kinds: list[str]  # the kinds of object its indexing job sent to it: uploads of these are answered from it
    modality: str  # its encoder's (``any`` for a general encoder)
    search: dict[str, Any] = {}  # how exact search answers: "scan" or "mih", the multi-index's size, measured times


class Health(BaseModel):
    status: str
    auth: bool
