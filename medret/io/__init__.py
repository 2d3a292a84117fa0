"""Readers: bytes or a path -> pixel arrays + metadata. They decode; they never normalise.

Which reader a file needs, and what the job does with it, is the business of :mod:`medret.kinds`.
Heavy decoders are imported inside the readers, on first use.
"""
