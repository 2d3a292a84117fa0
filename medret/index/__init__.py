"""The code index (LanceDB) and exact Hamming search."""

from medret.index.store import CodeIndex, list_tables, where_clause

__all__ = ["CodeIndex", "list_tables", "where_clause"]
