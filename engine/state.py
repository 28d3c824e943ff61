"""Streaming state of the language model: explicit tensors, one row per session slot.

Row `num_slots` is a scratch row: padding rows of a batch point at it, so they never touch a
live session. Nothing here is resized after allocation.
"""
from __future__ import annotations

import torch

from .config import LMConfig
from .kernels.decode_attention import paged_rows
from .quant import FP8, quantize_rows
from .sampling import SAMPLING_DEFAULTS


PAGE_SIZE = 128  # positions per KV page (a multiple of the decode attention's key tile)


class KVShort(RuntimeError):
    """The KV pool has no free page for a new session."""


class PagedKV:
    """Keys and values of the temporal transformer, held in pages as each session's history
    grows: a pool of pages [layers, pages, heads, page_size, head_dim] and a page table
    [slots, pages per slot] per slot. Logically each slot still has a ring: position p lives
    at ring index p mod window (`window_of[slot]`), and ring index i in page table[slot][i //
    page_size] at row i mod page_size. In e4m3 (kv_dtype "fp8") each key and value vector has
    a float32 scale beside it ([layers, pages, heads, page_size]).

    Page 0 is the scratch page: every table entry not backed by a page of its own points at it
    (the scratch slot's entries always do), so a padding row or a prefill's padding positions
    write there and nothing live is touched. A slot takes pages with `reserve` (on the host,
    before the step that writes them) and gives them back with `release`. pages None: every
    slot holds a whole window's pages from the start (code that steps slots without
    reserving, such as a bare `LMState`)."""

    def __init__(self, layers: int, slots: int, heads: int, window: int, head_dim: int, device, dtype,
                 kv_dtype: str | None = None, pages: int | None = None, page_size: int | None = None):
        self.window = window
        page_size = page_size or PAGE_SIZE
        if page_size & (page_size - 1):
            raise ValueError(f"the KV page size must be a power of two, got {page_size}")
        self.page_size = min(page_size, 1 << (window - 1).bit_length())
        self.pages_per_slot = -(-window // self.page_size)
        self.static = pages is None
        self.num_pages = slots * self.pages_per_slot if pages is None else int(pages)
        self.quantized = kv_dtype == "fp8"
        store = FP8 if self.quantized else dtype
        shape = (layers, 1 + self.num_pages, heads, self.page_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=store)
        self.v = torch.zeros(shape, device=device, dtype=store)
        self.k_scale = torch.ones(shape[:-1], device=device) if self.quantized else None
        self.v_scale = torch.ones(shape[:-1], device=device) if self.quantized else None
        n_slots = slots + 1   # (and the scratch slot)
        self.table = torch.zeros((n_slots, self.pages_per_slot), dtype=torch.long, device=device)
        self.window_of = torch.full((n_slots,), window, dtype=torch.long, device=device)
        self._held: list[list[int]] = [[] for _ in range(n_slots)]
        self._window = [window] * n_slots    # (`window_of` on the host)
        self._free = list(range(self.num_pages, 0, -1))   # (popped from the end: low pages first)
        self._edits: list[tuple[int, int, int]] = []
        if pages is None:
            for slot in range(slots):
                self.reserve(slot, window)
            self.flush()

    # -- pages (host side) ----------------------------------------------------------

    def pages_for(self, positions: int) -> int:
        """Pages that hold a slot's first `positions` positions."""
        return -(-min(max(positions, 0), self.window) // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def held(self, slot: int) -> int:
        return len(self._held[slot])

    def growing(self, slot: int) -> bool:
        """Whether the slot may still take pages (its history short of its window)."""
        return len(self._held[slot]) < self.pages_for(self._window[slot])

    def reserve(self, slot: int, positions: int) -> bool:
        """Backs the slot's first `positions` positions (at most its window) with pages of its
        own; all or nothing: False, and nothing taken, when the pool has too few."""
        held = self._held[slot]
        need = self.pages_for(min(positions, self._window[slot])) - len(held)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            page = self._free.pop()
            self._edits.append((slot, len(held), page))
            held.append(page)
        return True

    def release(self, slot: int) -> None:
        """Gives the slot's pages back; its table points at the scratch page again and its
        window is the full one (a whole-window pool keeps them)."""
        if self._window[slot] != self.window:
            self._window[slot] = self.window
            self.window_of[slot] = self.window
        if self.static:
            return
        held = self._held[slot]
        for j in range(len(held)):
            self._edits.append((slot, j, 0))
        self._free.extend(reversed(held))
        held.clear()

    def shrink(self, slot: int) -> int:
        """The slot's window cut to the pages it holds (when the pool has none left for it to
        grow): its ring wraps there, keeping its latest positions. Returns the new window."""
        w = len(self._held[slot]) * self.page_size
        if w < 1:
            raise KVShort("a session without a KV page cannot step")
        self._window[slot] = min(w, self.window)
        self.window_of[slot] = self._window[slot]
        return self._window[slot]

    def flush(self) -> None:
        """Writes the table entries changed since the last flush to the device (before a step
        or a prefill that reads them)."""
        if self._edits:
            s, j, p = zip(*self._edits)
            dev = self.table.device
            self.table[torch.tensor(s, device=dev), torch.tensor(j, device=dev)] = torch.tensor(p, device=dev)
            self._edits.clear()

    # -- tensors -----------------------------------------------------------------------

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.quantized:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def locate(self, slots: torch.Tensor, ring_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, row) of ring entries: slots, ring_idx [N]."""
        return self.table[slots, ring_idx // self.page_size], ring_idx % self.page_size

    def write(self, layer: int, slots: torch.Tensor, ring_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """slots, ring_idx: [N]; k, v: [N, heads, head_dim]."""
        page, row = self.locate(slots, ring_idx)
        if self.quantized:
            (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
            self.k_scale[layer][page, :, row] = ks
            self.v_scale[layer][page, :, row] = vs
        self.k[layer][page, :, row] = k.to(self.k.dtype)
        self.v[layer][page, :, row] = v.to(self.v.dtype)

    def _pages(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        return self.table.index_select(0, slots.view(-1))[:, :self.pages_for(n)]

    def gather(self, t: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
        """Ring entries 0..n-1 of the slots from one layer's pages t ([pages, H, P, ...]):
        [B, H, n, ...]."""
        return paged_rows(t, slots.view(-1), self.table, n)

    def read_slot(self, slot: int, n: int) -> tuple:
        """Ring entries 0..n-1 of one slot (n at most the window), every layer: k, v [layers, H,
        n, D] (and their scales [layers, H, n] in e4m3, else None)."""
        s = torch.tensor([slot], device=self.table.device)
        n = min(n, self.window)
        per_layer = lambda t: torch.stack([self.gather(t[i], s, n)[0] for i in range(t.shape[0])])  # noqa: E731
        scales = (per_layer(self.k_scale), per_layer(self.v_scale)) if self.quantized else None
        return per_layer(self.k), per_layer(self.v), scales

    def write_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor, scales=None) -> None:
        """`read_slot`'s tensors back into a slot's entries 0..n-1 (its pages reserved)."""
        n = k.shape[2]
        pages = self._pages(torch.tensor([slot], device=self.table.device), n)[0]
        for dst, src in ((self.k, k), (self.v, v)) + (((self.k_scale, scales[0]), (self.v_scale, scales[1]))
                                                       if scales is not None else ()):
            P = self.page_size
            full = src.new_zeros(src.shape[:2] + (pages.numel() * P,) + src.shape[3:])
            full[:, :, :n] = src
            # [L, H, np * P, ...] -> [L, np, H, P, ...]
            full = full.unflatten(2, (pages.numel(), P)).transpose(1, 2)
            dst[:, pages] = full.to(dst.dtype)

    def page_bytes(self) -> int:
        L, _, H, P, D = self.k.shape
        return 2 * L * H * P * (D * self.k.element_size() + (4 if self.quantized else 0))

    def bytes_per_slot(self) -> int:
        """Bytes of a slot whose history fills the window."""
        return self.pages_per_slot * self.page_bytes()


class LMState:
    """Token ring, provided mask and offset are the reference generator's `cache`,
    `provided` and `offset`, per slot; sampling settings sit beside them."""

    def __init__(self, cfg: LMConfig, num_slots: int, device, dtype, window: int | None = None,
                 kv_dtype: str | None = None, kv_pages: int | None = None, page_size: int | None = None):
        t = cfg.temporal
        S = num_slots + 1
        self.cfg = cfg
        self.num_slots = num_slots
        self.scratch = num_slots
        self.kv = PagedKV(t.num_layers, num_slots, t.num_heads, window or t.window, t.head_dim, device, dtype,
                          kv_dtype, pages=kv_pages, page_size=page_size)
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
