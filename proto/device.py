"""Device names as both sides of the contract accept them (``--device`` of the teacher, ``device`` of a job)."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU if there is one (``cuda:<local_rank>``), else the CPU; any other name as is."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
