"""The prompt phase (docs/SPEC.md): voice prompt, 0.5 s of silence, role prompt, 0.5 s of silence.

Every prompt step gives all 17 streams, so nothing the model predicts during the prompt is
kept: the temporal transformer only has to see the prompt's input columns, which a cheap
simulation of the reference's token ring yields. `plan_prompt` runs that simulation; the
engine then embeds the columns and runs one prefill pass over all prompt positions.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SILENCE_TOKENS, SINE_TOKENS, LMConfig
from .errors import VoiceError

SILENCE_FRAMES = 6  # 0.5 s at 12.5 Hz


@dataclass
class VoicePrompt:
    """A voice prompt in one of its two forms: the reference's `.pt` (embeddings fed as the
    input of T - 1 steps, then the token ring replaced by `cache`) or agent codes of a WAV."""
    name: str
    embeddings: torch.Tensor | None = None  # [T, dim] float
    cache: torch.Tensor | None = None       # [17, ring_size] int64
    codes: torch.Tensor | None = None       # [T, agent_codebooks] int64

    @property
    def frames(self) -> int:
        if self.embeddings is not None:
            return self.embeddings.shape[0]
        return 0 if self.codes is None else self.codes.shape[0]

    @property
    def key(self) -> str:
        """A digest of the voice's content: the prompt cache's key."""
        if getattr(self, "_key", None) is None:
            h = hashlib.sha256()
            for t in (self.embeddings, self.cache, self.codes):
                h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
            self._key = h.hexdigest()
        return self._key


def check_voice(cfg: LMConfig, voice: VoicePrompt) -> None:
    """Raises `VoiceError` unless the voice fits a model of this config."""
    if voice.embeddings is not None:
        if voice.embeddings.dim() != 2 or voice.embeddings.shape[1] != cfg.temporal.dim:
            raise VoiceError(f"voice prompt '{voice.name}' was made for a model of width "
                             f"{voice.embeddings.shape[-1]}, this model has {cfg.temporal.dim}")
        if voice.cache is None or tuple(voice.cache.shape) != (cfg.num_streams, cfg.ring_size):
            raise VoiceError(f"voice prompt '{voice.name}' has a token cache of the wrong shape")
    elif voice.codes is None:
        raise VoiceError(f"voice prompt '{voice.name}' is empty")


def load_voice_pt(path: str | Path, name: str | None = None) -> VoicePrompt:
    """A voice prompt in the reference's `.pt` format (loaded with weights_only=True)."""
    path = Path(path)
    try:
        d = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise VoiceError(f"'{path}' is not a voice prompt file ({e.__class__.__name__})") from None
    if not isinstance(d, dict) or "embeddings" not in d or "cache" not in d:
        raise VoiceError(f"'{path}' is not a voice prompt file (it needs 'embeddings' and 'cache')")
    emb, cache = d["embeddings"], d["cache"]
    if not (isinstance(emb, torch.Tensor) and isinstance(cache, torch.Tensor)):
        raise VoiceError(f"'{path}' is not a voice prompt file (its entries are not tensors)")
    if emb.dim() != 4 or emb.shape[1:3] != (1, 1) or cache.dim() != 3 or cache.shape[0] != 1:
        raise VoiceError(f"'{path}' is not a voice prompt file (embeddings {tuple(emb.shape)}, "
                         f"cache {tuple(cache.shape)})")
    return VoicePrompt(name or path.stem, embeddings=emb.reshape(emb.shape[0], emb.shape[-1]).float(),
                       cache=cache[0].long())


def save_voice_pt(voice: VoicePrompt, path: str | Path) -> None:
    """Writes the reference's `.pt` format: embeddings [T, 1, 1, dim], cache [1, 17, R]."""
    torch.save({"embeddings": voice.embeddings[:, None, None, :].contiguous(),
                "cache": voice.cache[None].contiguous()}, str(path))


@dataclass
class PromptPlan:
    """What the prompt leaves: the transformer's input at positions 0..P-1 (`embedding_rows`
    taken from the voice's embeddings, then token columns), and the token ring."""
    embedding_rows: int
    columns: torch.Tensor          # [P - embedding_rows, 17] int64
    tokens: torch.Tensor           # [17, R] ring after the prompt
    provided: torch.Tensor         # [17, R]
    offset: int
    text_ids: list[int] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return self.embedding_rows + self.columns.shape[0]


class _Ring:
    """The reference generator's token ring for one stream of fully given steps
    (plain Python lists: a prompt is a few hundred steps)."""

    def __init__(self, cfg: LMConfig):
        self.delays = list(cfg.delays)
        self.R = cfg.ring_size
        K = cfg.num_streams
        self.tokens = [[-2] * self.R for _ in range(K)]
        self.provided = [[False] * self.R for _ in range(K)]
        self.offset = 0
        self.initial = [cfg.text_initial_id] + [cfg.audio_initial_id] * cfg.n_q

    def step(self, given: list[int]) -> list[int] | None:
        """Writes a fully given column; returns the column the transformer reads this step,
        or None for the very first step, where the reference runs no model."""
        R, o = self.R, self.offset
        for k, d in enumerate(self.delays):
            self.tokens[k][(o + d) % R] = given[k]
            self.provided[k][(o + d) % R] = True
        for k, d in enumerate(self.delays):
            if o <= d:
                self.tokens[k][o % R] = self.initial[k]
                self.provided[k][o % R] = True
        if o == 0:
            for k, row in enumerate(self.tokens):
                row[0] = self.initial[k]
            self.offset = 1
            return None
        c = (o - 1) % R
        col = [row[c] for row in self.tokens]
        # Every target stream is provided, so the prediction changes nothing.
        for row in self.provided:
            row[c] = False
        self.offset = o + 1
        return col


def _frame(text: int, agent) -> list[int]:
    """A fully given prompt column: the text, the agent's 8 codes, the user's sine codes."""
    return [int(text), *(int(a) for a in agent), *SINE_TOKENS]


def plan_prompt(cfg: LMConfig, voice: VoicePrompt | None, text_ids: list[int],
                voice_only: bool = False) -> PromptPlan:
    """Simulates the reference's prompt steps (voice, silence, role prompt, silence), or
    with `voice_only` the voice's steps alone (what the reference saves as a `.pt`)."""
    if cfg.agent_codebooks != len(SILENCE_TOKENS):
        raise ValueError("the prompt phase needs 8 agent and 8 user codebooks")
    ring = _Ring(cfg)
    pad = cfg.text_padding_id
    columns: list[torch.Tensor] = []
    embedding_rows = 0
    if voice is not None and voice.embeddings is not None:
        # step_embeddings(): dummy tokens (text 3, audio initial), the first call at offset 0
        # runs nothing and is repeated; each embedding then replaces one input column.
        dummy = [pad] + [cfg.audio_initial_id] * cfg.n_q
        for _ in range(voice.embeddings.shape[0]):
            while ring.step(dummy) is None:
                pass
            embedding_rows += 1
        ring.tokens = [list(map(int, row)) for row in voice.cache.tolist()]
    elif voice is not None and voice.codes is not None:
        for codes in voice.codes:
            col = ring.step(_frame(pad, codes.tolist()))
            if col is not None:
                columns.append(col)
    steps = [_frame(pad, SILENCE_TOKENS)] * SILENCE_FRAMES
    steps += [_frame(t, SILENCE_TOKENS) for t in text_ids]
    steps += [_frame(pad, SILENCE_TOKENS)] * SILENCE_FRAMES
    if voice_only:
        steps = []
    for given in steps:
        col = ring.step(given)
        if col is not None:
            columns.append(col)
    cols = torch.tensor(columns, dtype=torch.long).view(-1, cfg.num_streams)
    return PromptPlan(embedding_rows, cols, torch.tensor(ring.tokens, dtype=torch.long),
                      torch.tensor(ring.provided, dtype=torch.bool), ring.offset, list(text_ids))


@dataclass
class PromptState:
    """What a prompt leaves in a slot: the KV ring entries 0..n-1 of every layer and the
    token ring. Restoring it gives the state the prefill gives."""
    k: torch.Tensor          # [layers, heads, n, head_dim]
    v: torch.Tensor
    tokens: torch.Tensor
    provided: torch.Tensor
    offset: int
    text_tokens: int
    scales: tuple[torch.Tensor, torch.Tensor] | None = None  # of e4m3 rings

    @property
    def nbytes(self) -> int:
        extra = 2 * self.scales[0].numel() * 4 if self.scales is not None else 0
        return 2 * self.k.numel() * self.k.element_size() + extra


class PromptCache:
    """A bounded (bytes) least-recently-used cache of prompt states, keyed by
    (checkpoint, voice, role-prompt ids), so a repeated persona starts with one copy."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._d: OrderedDict[tuple, PromptState] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key) -> PromptState | None:
        st = self._d.get(key)
        if st is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return st

    def put(self, key, st: PromptState) -> None:
        if st.nbytes > self.max_bytes or key in self._d:
            return
        self._d[key] = st
        self.bytes += st.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._d)
