"""The KV cache: preallocated, explicit, with a position per sequence.

Each sequence writes the keys/values of the token at position p into slot p of its own row, so rows of a batch
can be at different lengths (right-padded prompts, requests that join a running batch). A query at position p
attends to slots 0..p of its row; slots beyond a row's length may hold stale values and are never attended.
"""

from __future__ import annotations

import torch

from .config import GPT4Config


class KVCache:
    def __init__(self, config: GPT4Config, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_length > config.max_position_embeddings and config.position_embedding == "learned":
            raise ValueError(
                f"A cache of {max_length} positions exceeds this model's {config.max_position_embeddings} "
                "learned positions; shorten the prompt or max_new_tokens."
            )
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, T, D)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, S, D) at `positions` (B, S); return this layer's first kv_length slots."""
        batch = positions.shape[0]
        rows = torch.arange(batch, device=positions.device)[:, None]  # (B, 1) broadcasts with positions (B, S)
        # Advanced indices separated by a slice put the broadcast dims first: the target is (B, S, Hkv, D).
        self.keys[layer, :batch][rows, :, positions] = k.transpose(1, 2)
        self.values[layer, :batch][rows, :, positions] = v.transpose(1, 2)
        return self.keys[layer, :batch, :, :kv_length], self.values[layer, :batch, :, :kv_length]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows, in that order (e.g. to drop finished sequences)."""
        self.keys = self.keys[:, rows].contiguous()
        self.values = self.values[:, rows].contiguous()
