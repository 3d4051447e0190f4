"""Seeds that are the same in every process and run (no Ray, no torch)."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from `parts` (numbers and strings), the same in every process and run
    (Python's own `hash` of a string is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
