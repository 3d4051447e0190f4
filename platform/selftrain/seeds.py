"""Seeds that are the same in every process and run (no Ray, no torch)."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from `parts` (numbers and strings), the same in every process and run
    (Python's own `hash` of a string is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def relative_key(path: str, root: str) -> str:
    """`path` as seen from its data root: what seeds a row's augmentation and ranks it, so a
    dataset copied or mounted elsewhere gives the same run. A path outside `root` (or an empty
    root) stays whole. A root that is one file (a Parquet pool) keeps its name: `pool.parquet#row=3`."""
    root = root.rstrip("/")
    if not root:
        return path
    if path == root or path.startswith(root + "#"):
        return root.rsplit("/", 1)[-1] + path[len(root):]
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path
