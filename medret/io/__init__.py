"""Readers: bytes -> pixel arrays + metadata. They decode; they never normalise."""
