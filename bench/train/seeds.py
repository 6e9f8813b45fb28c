"""Independent random streams from one job seed (below ``tasks`` and ``markov``, which both draw data)."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, stream: str) -> int:
    """An independent seed for one random stream (init, data, batches) of a job's seed."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:7], "little")
