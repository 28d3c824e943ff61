"""The reference's ScaledEmbedding lookup: id -1 gives a zero vector (the "zero" token), other
negative ids read row 0. Torch's gather does it; in the one-row product it is a prologue."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_ref(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    out = F.embedding(ids.clamp(min=0), table)
    return torch.where((ids == -1).unsqueeze(-1), torch.zeros((), dtype=out.dtype, device=out.device), out)
