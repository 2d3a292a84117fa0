"""Object storage: the only layer in medret that talks to S3 or walks folders."""

from medret.storage.objects import LocalStore, ObjectInfo, ObjectStore, open_store
from medret.storage.s3 import S3Store
from medret.storage.uri import StorageURI, parse_uri

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "StorageURI",
    "open_store",
    "parse_uri",
]
