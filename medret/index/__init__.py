"""The code index (LanceDB) and exact Hamming search."""

from medret.index.filters import where_clause
from medret.index.store import CodeIndex, list_tables

__all__ = ["CodeIndex", "list_tables", "where_clause"]
