"""Streaming state of the language model: explicit tensors, one row per session slot.

Row `num_slots` is a scratch row: padding rows of a batch point at it, so they never touch a
live session. Nothing here is resized after allocation.
"""
from __future__ import annotations

import torch

from .config import LMConfig
from .quant import FP8, quantize_rows
from .sampling import SAMPLING_DEFAULTS


class KVRings:
    """Keys and values of the temporal transformer: [layers, slots, heads, window, head_dim].
    Position p of a slot lives at index p mod window. In e4m3 (kv_dtype "fp8"), each key and
    value vector has a float32 scale beside it ([layers, slots, heads, window])."""

    def __init__(self, layers: int, slots: int, heads: int, window: int, head_dim: int, device, dtype,
                 kv_dtype: str | None = None):
        shape = (layers, slots, heads, window, head_dim)
        self.window = window
        self.quantized = kv_dtype == "fp8"
        store = FP8 if self.quantized else dtype
        self.k = torch.zeros(shape, device=device, dtype=store)
        self.v = torch.zeros(shape, device=device, dtype=store)
        self.k_scale = torch.ones(shape[:-1], device=device) if self.quantized else None
        self.v_scale = torch.ones(shape[:-1], device=device) if self.quantized else None

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.quantized:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def write(self, layer: int, slots: torch.Tensor, ring_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """slots, ring_idx: [N]; k, v: [N, heads, head_dim]."""
        if self.quantized:
            (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
            self.k_scale[layer][slots, :, ring_idx] = ks
            self.v_scale[layer][slots, :, ring_idx] = vs
        self.k[layer][slots, :, ring_idx] = k.to(self.k.dtype)
        self.v[layer][slots, :, ring_idx] = v.to(self.v.dtype)

    def bytes_per_slot(self) -> int:
        n = 2 * self.k[:, 0].numel() * self.k.element_size()
        return n + (2 * self.k_scale[:, 0].numel() * 4 if self.quantized else 0)


class LMState:
    """Token ring, provided mask and offset are the reference generator's `cache`,
    `provided` and `offset`, per slot; sampling settings sit beside them."""

    def __init__(self, cfg: LMConfig, num_slots: int, device, dtype, window: int | None = None,
                 kv_dtype: str | None = None):
        t = cfg.temporal
        S = num_slots + 1
        self.cfg = cfg
        self.num_slots = num_slots
        self.scratch = num_slots
        self.kv = KVRings(t.num_layers, S, t.num_heads, window or t.window, t.head_dim, device, dtype, kv_dtype)
        K, R = cfg.num_streams, cfg.ring_size
        self.tokens = torch.full((S, K, R), -2, dtype=torch.long, device=device)
        self.provided = torch.zeros((S, K, R), dtype=torch.bool, device=device)
        self.offset = torch.zeros(S, dtype=torch.long, device=device)
        self.delays = torch.tensor(cfg.delays, dtype=torch.long, device=device)
        self.initial = torch.tensor(
            [cfg.text_initial_id] + [cfg.audio_initial_id] * cfg.n_q, dtype=torch.long, device=device)
        # the streams with a delay (`write_initial`), with their delays and initial tokens, picked
        # once here rather than gathered in every step
        self.delayed_streams = torch.tensor([k for k, d in enumerate(cfg.delays) if d >= 1], dtype=torch.long,
                                            device=device)
        self.delayed_delays = self.delays[self.delayed_streams]
        self.delayed_initial = self.initial[self.delayed_streams]
        # sampling, per slot
        self.seed_text = torch.zeros(S, dtype=torch.long, device=device)
        self.seed_audio = torch.zeros(S, dtype=torch.long, device=device)
        d = SAMPLING_DEFAULTS
        self.temp_text = torch.full((S,), d.temp_text, dtype=torch.float32, device=device)
        self.temp_audio = torch.full((S,), d.temp_audio, dtype=torch.float32, device=device)
        self.topk_text = torch.full((S,), d.topk_text, dtype=torch.long, device=device)
        self.topk_audio = torch.full((S,), d.topk_audio, dtype=torch.long, device=device)
        self.greedy = torch.zeros(S, dtype=torch.bool, device=device)
        # The scratch row takes the padding rows of a batch: give it a valid position and
        # tokens so that its (discarded) results stay finite.
        self.tokens[self.scratch] = self.initial.view(-1, 1)
        self.offset[self.scratch] = cfg.max_delay + 1
        self.greedy[self.scratch] = True

    def set_sampling(self, slot: int, *, seed: int, temp_text: float, temp_audio: float,
                     topk_text: int, topk_audio: int, greedy: bool, audio_seed: int | None = None) -> None:
        self.seed_text[slot] = int(seed) & 0xFFFFFFFF
        self.seed_audio[slot] = int(seed if audio_seed is None else audio_seed) & 0xFFFFFFFF
        self.temp_text[slot] = float(temp_text)
        self.temp_audio[slot] = float(temp_audio)
        self.topk_text[slot] = int(topk_text)
        self.topk_audio[slot] = int(topk_audio)
        self.greedy[slot] = bool(greedy)

    def load_ring(self, slot: int, tokens: torch.Tensor, provided: torch.Tensor, offset: int) -> None:
        self.tokens[slot] = tokens.to(self.tokens.device)
        self.provided[slot] = provided.to(self.provided.device)
        self.offset[slot] = int(offset)

    def kv_bytes_per_slot(self) -> int:
        return self.kv.bytes_per_slot()
