"""Hashes of our own source files, so compile caches miss when a pass or kernel changes."""

from __future__ import annotations

import functools
import hashlib
import inspect


@functools.lru_cache(maxsize=None)
def source_hash(*objects: object, extra: str = "") -> str:
    """sha256 over the source files that define `objects` (classes, functions or modules)."""
    digest = hashlib.sha256(extra.encode())
    for path in sorted({inspect.getsourcefile(o) for o in objects}):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()
