"""Hashing, and the atomic writers every stage uses (one implementation, in `vidtune.training.files`)."""

from __future__ import annotations

import hashlib
from typing import IO

from vidtune.training.files import atomic_path, write_json_atomic

__all__ = ["atomic_path", "sha256_of", "write_json_atomic"]


def sha256_of(stream: IO[bytes], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := stream.read(chunk):
        digest.update(block)
    return digest.hexdigest()
