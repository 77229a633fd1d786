"""Who am I in a multi-process job: rank/world from explicit arguments, an initialised
torch.distributed group, or the RANK/WORLD_SIZE environment (torchrun). Never imports torch."""

from __future__ import annotations

import os
import sys

__all__ = ["resolve_rank_world"]


def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit values win, then torch.distributed (if already imported and
    initialised), then the RANK / WORLD_SIZE environment, else (0, 1)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both rank and world_size, or neither")
        r, w = int(rank), int(world_size)
    else:
        r, w = 0, 1
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"invalid rank {r} for world size {w}")
    return r, w
