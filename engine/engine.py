"""`Engine`: session slots over one loaded model, and `step`, the only call a frontend makes
per 80 ms frame.

A PersonaPlex slot is opened with a voice prompt, a role prompt, sampling settings and a seed;
opening runs the prompt phase as one prefill pass. A Moshi slot (Kyutai's checkpoints) is opened
with sampling settings alone and starts from the model's initial tokens. `step` takes one frame
of user audio for every slot that has one and returns, per slot, one frame of agent audio and
the text token (none yet for a Moshi slot's first frame: its acoustic delay).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import numpy as np
import torch

from . import switches
from . import weights as W
from .errors import UserError
from .config import DEFAULT_TEXT_PROMPT, MOSHI_7B, ModelConfig, PERSONAPLEX_7B, TEXT_PAD, load_config
from .lm import LM
from .mimi import Mimi, MimiState
from .sampling import SamplingParams
from .prompts import PromptCache, PromptPlan, PromptState, VoicePrompt, check_voice, plan_prompt
from .state import PAGE_SIZE, LMState
from .tick import lm_tick, start_stream, user_streams, write_streams
from .tokenizer import Tokenizer

log = logging.getLogger("ppx.engine")


class EngineFull(UserError, RuntimeError):
    """Every slot is taken, or the KV cache has no room for another session."""


# Batch buckets of the tick's graphs, and prompt-length buckets of the prefill's (voice frames
# + 12 + role-prompt tokens: a bucket past a prompt's length costs its padding rows' products;
# steps of 32 up to 512 keep that under a third).
TICK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Sessions a GPU engine holds by default at most (each a slot of the batch).
MAX_SLOTS = 256
PREFILL_BUCKETS = tuple(range(64, 513, 32)) + (640, 768, 1024)
# Uncached prompts opened together that replay a prefill graph each (`Engine._prefill_replays`).
MAX_PROMPT_REPLAYS = 4
MAX_PROMPT_REPLAYS_FP8 = 1


class StepOutput(NamedTuple):
    """One tick of a batch: the agent's audio [B, frame_size] float32 and the output tokens
    [B, 17]; the text logits [B, text_card] and audio logits [B, depformer steps, card]
    (float32) when asked for, else None."""
    audio: torch.Tensor
    tokens: torch.Tensor
    text_logits: torch.Tensor | None = None
    audio_logits: torch.Tensor | None = None


@dataclass
class FrameOut:
    pcm: np.ndarray        # [frame_size] float32, 24 kHz
    text_id: int           # the frame's text token
    tokens: np.ndarray     # [17] all streams of the output frame
    valid: bool = True     # False: no output yet (a Moshi slot's first frame); pcm is silence


@dataclass
class _Slot:
    voice: str
    prompt_tokens: int
    seed: int
    frames: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    fresh: bool = False    # a Moshi slot before its first step
    next_pos: int = 0      # the temporal position its next step writes


class Engine:
    def __init__(self, cfg: ModelConfig, lm: LM, mimi: Mimi, tokenizer: Tokenizer, *, max_slots: int = 1,
                 depformer_steps: int | None = None, checkpoint_id: str = "", mimi_id: str = "",
                 kv_window: int | None = None, prompt_cache_bytes: int | None = None,
                 kv_cache_dtype: str | None = None, kv_pages: int | None = None, kv_page_size: int | None = None):
        self.cfg = cfg
        self.lm = lm
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.device = next(lm.parameters()).device
        self.dtype = lm.dtype
        self.max_slots = max_slots
        self.checkpoint_id = checkpoint_id
        self.mimi_id = mimi_id   # (what a cached encoding of a voice recording depends on)
        # Steps past the agent's codebooks predict the user's, which are always given.
        self.depformer_steps = depformer_steps or cfg.lm.agent_codebooks
        if not cfg.lm.agent_codebooks <= self.depformer_steps <= cfg.lm.depformer.steps:
            raise UserError(f"depformer steps must be {cfg.lm.agent_codebooks}..{cfg.lm.depformer.steps}")
        window = cfg.lm.temporal.window
        if kv_window is not None and not 1 <= kv_window <= window:
            raise UserError(f"the KV window must be 1..{window} frames, got {kv_window}")
        if kv_window is not None and kv_window < window:
            log.warning("KV rings hold %d frames: sessions longer than that see less history than the reference",
                        kv_window)
        # kv_pages None: enough for every slot to fill its window
        self.lm_state = LMState(cfg.lm, max_slots, self.device, self.dtype, window=kv_window,
                                kv_dtype=kv_cache_dtype, kv_pages=kv_pages, page_size=kv_page_size)
        self.kv_shrunk = 0   # sessions whose window was cut for want of KV memory
        self.mimi_state = MimiState(mimi, max_slots, self.device)
        self.slots: dict[int, _Slot] = {}
        self._free = list(range(max_slots))
        self._user_streams = user_streams(cfg.lm, self.device)
        self._user_delays = self.lm_state.delays[self._user_streams]
        # Mimi's encoder runs beside the language model (see `tick`); cuDNN picks its
        # convolution algorithms by timing them during the warm-up.
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # A step waits for its tick on an event made with blocking sync: the thread sleeps instead
        # of spinning a core for the tick's length (a server's frontends need those cores under load).
        self._tick_done = torch.cuda.Event(blocking=True) if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.graphs = None
        self.graph_memory = 0   # bytes the tick's graphs hold (`enable_graphs`)
        self._graph_logits = False
        self.prefill_graphs = None
        if prompt_cache_bytes is None:
            prompt_cache_bytes = (2 << 30) if self.device.type == "cuda" else (256 << 20)
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self._voice_lock = threading.Lock()   # (`encode_voice`)
        self._voice_state: MimiState | None = None
        self._voice_stream = None

    # ------------------------------------------------------------------------------
    # loading

    @classmethod
    def load(cls, *, config: ModelConfig | str | None = None, moshi_weight=None, mimi_weight=None,
             tokenizer=None, hf_repo: str = W.DEFAULT_HF_REPO, device: str | torch.device = "cuda",
             dtype: torch.dtype | None = None, max_slots: int | None = 1, depformer_steps: int | None = None,
             kv_window: int | None = None, cuda_graphs: bool | None = None, quantize: str | None = None,
             kv_cache_dtype: str | None = None, random_weights: bool = False, seed: int = 0,
             most_slots: int | None = None, kv_page_size: int | None = None,
             kv_pages: int | None = None) -> "Engine":
        """Loads the model (local files where given, the rest from the hub repo), then on a GPU
        warms up and captures the tick as CUDA graphs. max_slots None: as many sessions as the
        free GPU memory holds once the weights are in (one on the CPU), at most `most_slots`
        (a batch of so many items needs no more). random_weights: the
        config's shapes with random values drawn on the device (benchmarks; only the tokenizer
        is read). The KV cache is a pool of pages of `kv_page_size` positions (default
        `state.PAGE_SIZE`) taken as sessions grow: `kv_pages` of them, by default on a GPU as
        many as the free memory holds (at most a whole window per slot), on the CPU a whole
        window per slot."""
        from .device import check_device
        from .quant import check_fp8_device

        t0 = time.monotonic()
        device = torch.device(device)
        check_device(device)
        if quantize == "fp8" or kv_cache_dtype == "fp8":
            check_fp8_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cfg = PERSONAPLEX_7B if random_weights and config is None else resolve_config(config, moshi_weight, hf_repo)
        tok_path = W.resolve_file(tokenizer, W.TOKENIZER_FILE, hf_repo)
        if random_weights:
            from .random_weights import random_lm, random_mimi
            log.warning("RANDOM weights of the %s shapes (%s, %s): the output is noise", cfg.name, device,
                        str(dtype).replace("torch.", ""))
            lm, mimi = random_lm(cfg.lm, device, dtype, seed, quantize), random_mimi(cfg.mimi, device, seed)
            lm_id = mimi_id = f"random-{seed}"
        else:
            lm_path = W.resolve_file(moshi_weight, W.LM_FILE, hf_repo)
            mimi_path = W.resolve_file(mimi_weight, W.MIMI_FILE, hf_repo)
            log.info("loading the language model from %s (%s, %s)", lm_path, device,
                     str(dtype).replace("torch.", ""))
            lm = W.materialize(lambda dtype: LM(cfg.lm, dtype=dtype, quant=quantize), device, dtype)
            W.load_lm_weights(lm, lm_path, cfg.lm)
            log.info("loading Mimi from %s", mimi_path)
            mimi = W.materialize(lambda dtype: Mimi(cfg.mimi, dtype=dtype), device, torch.float32)
            W.load_mimi_weights(mimi, mimi_path, cfg.mimi)
            lm_id, mimi_id = W.file_id(lm_path), W.file_id(mimi_path)
        tok = Tokenizer(tok_path, vocab_size=cfg.lm.text_card)
        window = kv_window or cfg.lm.temporal.window
        page = min(kv_page_size or PAGE_SIZE, 1 << (window - 1).bit_length())
        pages_given = kv_pages
        if device.type == "cuda":
            fit = kv_pages_that_fit(cfg, device, dtype, page, kv_cache_dtype,
                                    slots=max_slots or min(most_slots or MAX_SLOTS, MAX_SLOTS))
            per_slot = -(-window // page)
            if max_slots is None:
                # as many sessions as fit when each lasts a minute; longer ones are admitted
                # while their pages fit (`Engine._admit`)
                planned = -(-min(PLANNED_SESSION_FRAMES, window) // page)
                max_slots = max(1, min(most_slots or MAX_SLOTS, MAX_SLOTS, fit // planned))
            kv_pages = pages_given or min(fit, max_slots * per_slot)
            log.info("room for %d sessions; KV cache of %d pages of %d frames (%.1f GB; %.0f sessions at full context)",
                     max_slots, kv_pages, page, kv_pages * page * kv_position_bytes(cfg, dtype, kv_cache_dtype) / 1e9,
                     kv_pages / per_slot)
        else:
            max_slots = max_slots or 1
            kv_pages = pages_given or max_slots * -(-window // page)
        if cfg.moshi:
            log.info("%s: Kyutai's Moshi: no voice or role prompt, a conversation starts from the model's initial "
                     "tokens", cfg.name)
        eng = cls(cfg, lm, mimi, tok, max_slots=max_slots, depformer_steps=depformer_steps, checkpoint_id=lm_id,
                  mimi_id=mimi_id, kv_window=kv_window, kv_cache_dtype=kv_cache_dtype, kv_pages=kv_pages,
                  kv_page_size=page)
        t_load = time.monotonic() - t0
        t_graphs = 0.0
        if device.type == "cuda" and (switches.CUDA_GRAPHS if cuda_graphs is None else cuda_graphs):
            t_graphs = eng.enable_graphs()
        log.info("ready in %.1f s (loading %.1f s, warm-up and graph capture %.1f s); weights %.2f GB, KV %.2f GB "
                 "per session at full context", time.monotonic() - t0, t_load, t_graphs,
                 sum(p.numel() * p.element_size() for p in lm.parameters()) / 1e9,
                 eng.lm_state.kv_bytes_per_slot() / 1e9)
        return eng

    @property
    def frame_size(self) -> int:
        return self.cfg.mimi.frame_size

    @property
    def sample_rate(self) -> int:
        return self.cfg.mimi.sample_rate

    # ------------------------------------------------------------------------------
    # voices

    @torch.no_grad()
    def encode_voice(self, pcm: np.ndarray, name: str = "voice") -> VoicePrompt:
        """Agent codes of a voice recording (24 kHz mono float32, loudness-normalised),
        Mimi-encoded frame by frame from a fresh encoder, as the reference does. It has a
        streaming state of its own and, on a GPU, a stream of its own, so a thread may encode
        voices while another steps the sessions (one voice at a time)."""
        from .audio import frames

        with self._voice_lock:
            if self._voice_state is None:
                self._voice_state = MimiState(self.mimi, 1, self.device)
                self._voice_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            state, slot = self._voice_state, 0
            state.reset(slot)
            slots = torch.tensor([slot], device=self.device)
            ctx = torch.cuda.stream(self._voice_stream) if self._voice_stream is not None else contextlib.nullcontext()
            codes = []
            with ctx:
                for f in frames(pcm, self.frame_size):
                    codes.append(self.mimi.encode(torch.from_numpy(f).to(self.device)[None], state, slots)[0])
                    time.sleep(0)  # (lets a thread waiting for the GIL, the one stepping sessions, go first)
            codes = torch.stack(codes).cpu()
        return VoicePrompt(name, codes=codes)

    @torch.no_grad()
    def voice_embeddings(self, voice: VoicePrompt) -> VoicePrompt:
        """The reference's `.pt` form of a voice given as codes: the transformer inputs of its
        steps and the token ring they leave."""
        plan = plan_prompt(self.cfg.lm, voice, [], voice_only=True)
        emb = self.lm.embed(plan.columns.to(self.device)).float().cpu()
        return VoicePrompt(voice.name, embeddings=emb, cache=plan.tokens.clone())

    # ------------------------------------------------------------------------------
    # slots

    @torch.no_grad()
    def open(self, voice: VoicePrompt | None = None, text_prompt: str | None = None,
             sampling: SamplingParams | None = None) -> int:
        """Takes a free slot and runs the prompt phase into it (PersonaPlex: `text_prompt` None is
        the default role prompt; Moshi: no voice or role prompt); returns the slot index."""
        return self.open_many([(voice, text_prompt, sampling)])[0]

    @torch.no_grad()
    def open_many(self, requests: list[tuple[VoicePrompt | None, str | None, SamplingParams | None]]) -> list[int]:
        """Opens several slots; their uncached prompts run as one batched prefill pass."""
        prepared = []
        for voice, text, sampling in requests:
            sampling = sampling or SamplingParams()
            sampling.validate()
            if self.cfg.moshi:
                if voice is not None:
                    raise UserError("a Moshi checkpoint takes no voice prompt: it speaks in its own voice")
                if text:
                    raise UserError("a Moshi checkpoint takes no role prompt: it starts every conversation cold")
                ids = []
            else:
                if voice is not None:
                    check_voice(self.cfg.lm, voice)
                ids = self.tokenizer.encode_prompt(DEFAULT_TEXT_PROMPT if text is None else text)
            prepared.append((voice, ids, sampling))
        if len(prepared) > len(self._free):
            raise EngineFull(f"all {self.max_slots} session slots are in use")
        slots = [self._free.pop(0) for _ in prepared]
        kv = self.lm_state.kv
        try:
            todo, starts = [], []
            for slot, (voice, ids, sampling) in zip(slots, prepared):
                if self.cfg.moshi:
                    starts.append(0)
                    continue
                key = (self.checkpoint_id, voice.key if voice is not None else None, tuple(ids))
                cached = self.prompt_cache.get(key)
                plan = None if cached is not None else plan_prompt(self.cfg.lm, voice, ids)
                starts.append((cached or plan).offset - 1)
                todo.append((slot, voice, plan, key, cached))
            self._admit(slots, starts)
            kv.flush()
            for slot in slots:
                if self.cfg.moshi:
                    self._start_cold(slot)
            for slot, _, _, _, cached in todo:
                if cached is not None:
                    self._restore(slot, cached)
            todo = [t for t in todo if t[4] is None]
            if todo:
                self._prefill([t[0] for t in todo], [t[1] for t in todo], [t[2] for t in todo])
                for slot, _, plan, key, _ in todo:
                    self.prompt_cache.put(key, self._snapshot(slot, plan))
            for slot, start, (voice, ids, sampling) in zip(slots, starts, prepared):
                seed = sampling.resolved_seed()
                self.lm_state.set_sampling(slot, seed=seed, temp_text=sampling.temp_text,
                                           temp_audio=sampling.temp_audio, topk_text=sampling.topk_text,
                                           topk_audio=sampling.topk_audio, greedy=sampling.greedy,
                                           audio_seed=sampling.resolved_audio_seed(seed))
                self.mimi_state.reset(slot)
                self.slots[slot] = _Slot(voice=voice.name if voice else "", prompt_tokens=len(ids), seed=seed,
                                         fresh=self.cfg.moshi, next_pos=start)
        except BaseException:
            for slot in slots:
                self.slots.pop(slot, None)
                kv.release(slot)
            self._free = sorted(set(self._free) | set(slots))
            raise
        return slots

    def _admit(self, slots: list[int], starts: list[int]) -> None:
        """Takes the KV pages of new sessions' prompts and first steps, or refuses them
        (EngineFull) when those pages and a reserve would not fit: one page for every live
        session still growing, so that the sessions already talking can go on."""
        kv = self.lm_state.kv
        need = sum(max(0, kv.pages_for(n + 1) - kv.held(s)) for s, n in zip(slots, starts))
        growing = sum(1 for s in self.slots if kv.growing(s))
        if need + growing > kv.free_pages:
            raise EngineFull(f"the KV cache is full: {kv.free_pages} of {kv.num_pages} pages free, a new session "
                             f"needs {need // len(slots)} and the {len(self.slots)} live ones keep {growing} in reserve")
        for slot, n in zip(slots, starts):
            kv.reserve(slot, n + 1)

    def _grow(self, slot_list: list[int]) -> None:
        """Before a step: a page for each slot whose next position starts one. A slot the pool
        cannot serve any more keeps stepping over the history its pages hold (`PagedKV.shrink`)."""
        kv = self.lm_state.kv
        for s in slot_list:
            rec = self.slots[s]
            if not kv.reserve(s, rec.next_pos + 1):
                w = kv.shrink(s)
                self.kv_shrunk += 1
                log.warning("KV memory is full: slot %d keeps its last %d frames (%.0f s) of context from here on",
                            s, w, w * self.cfg.mimi.frame_size / self.sample_rate)
            rec.next_pos += 1
        kv.flush()

    def reserve_kv(self, slot: int, positions: int) -> None:
        """Backs a slot's first `positions` positions with pages now (for callers that step it
        through `tick`, `lm_tick` or `step_tensors`, which take none themselves)."""
        if not self.lm_state.kv.reserve(slot, positions):
            raise EngineFull(f"the KV cache has no {positions} positions free for slot {slot}")
        self.lm_state.kv.flush()

    def kv_room(self, positions: int = 400) -> int:
        """New sessions whose prompts of `positions` (a voice prompt and a role prompt take
        about 400) the KV cache would admit now."""
        kv = self.lm_state.kv
        if kv.static:   # (every slot holds its pages already)
            return len(self._free)
        need = kv.pages_for(positions + 1)
        grows = need < kv.pages_per_slot
        free, growing, room = kv.free_pages, sum(1 for s in self.slots if kv.growing(s)), 0
        while room < len(self._free) and need + growing <= free:   # (as `_admit` decides)
            room, free, growing = room + 1, free - need, growing + grows
        return room

    def process_cpu(self) -> float:
        """CPU seconds of this process, every thread."""
        return time.process_time()

    def used_slots(self) -> int:
        """Slots holding a session."""
        return len(self.slots)

    def gpu_memory(self) -> int:
        """Bytes of GPU memory the engine's tensors hold (0 on the CPU)."""
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def kv_stats(self) -> dict:
        """Pages of the KV cache: total, used and free, their size, and the sessions whose
        window was cut for want of them."""
        kv = self.lm_state.kv
        return {"pages": kv.num_pages, "used": kv.used_pages, "free": kv.free_pages, "page_positions": kv.page_size,
                "page_bytes": kv.page_bytes(), "shrunk": self.kv_shrunk}

    def _start_cold(self, slot: int) -> None:
        """A Moshi conversation's start: an empty token ring with the initial tokens at column 0
        and offset 1, as Kyutai's generator begins (its KV rings are read only up to each step's
        position, so what an earlier session left there is never seen)."""
        st = self.lm_state
        st.tokens[slot] = -2
        st.provided[slot] = False
        K = self.cfg.lm.num_streams
        idx = torch.tensor([slot], device=self.device)
        start_stream(st, idx, torch.zeros(1, K, dtype=torch.long, device=self.device),
                     torch.zeros(1, K, dtype=torch.bool, device=self.device))

    def close(self, slot: int) -> None:
        if slot in self.slots:
            del self.slots[slot]
            self.lm_state.kv.release(slot)
            self._free.append(slot)
            self._free.sort()

    def _prefill(self, slots: list[int], voices: list[VoicePrompt | None], plans: list[PromptPlan]) -> None:
        lm = self.lm
        rows = []
        for voice, plan in zip(voices, plans):
            x = lm.embed(plan.columns.to(self.device))
            if plan.embedding_rows:
                x = torch.cat([voice.embeddings.to(self.device, x.dtype), x], dim=0)
            rows.append(x)
        if self._prefill_replays([r.shape[0] for r in rows]):
            for slot, r in zip(slots, rows):
                self._prefill_replay(slot, r)
        else:
            self._prefill_eager(slots, rows)
        for slot, plan in zip(slots, plans):
            self.lm_state.load_ring(slot, plan.tokens, plan.provided, plan.offset)

    def _prefill_replays(self, lengths: list[int]) -> bool:
        """Whether prompts of these lengths, opened together, run as a graph replay each rather
        than one eager batched pass: a replay reads every weight once, where the eager pass
        pays the host's launches; with e4m3 weights one batched pass of several prompts is
        faster, so there only a prompt alone replays."""
        g = self.prefill_graphs
        return (g is not None and len(lengths) <= (MAX_PROMPT_REPLAYS_FP8 if self.lm.quantized else MAX_PROMPT_REPLAYS)
                and all(g.bucket(n) is not None for n in lengths))

    def _prefill_replay(self, slot: int, rows: torch.Tensor) -> None:
        """One prompt's prefill ([n, dim] input rows) in the smallest length bucket that holds it,
        its rows past n zeros: every row is written to the KV rings, and the padding's entries
        are written again by stepping before any query reads them (`LM.temporal_prefill`)."""
        n = rows.shape[0]
        b = self.prefill_graphs.bucket(n)
        x, slot_buf = b.buffers
        x[0, :n].copy_(rows)
        x[0, n:].zero_()
        slot_buf.fill_(slot)
        self.prefill_graphs.replay(b)

    def _prefill_eager(self, slots: list[int], rows: list[torch.Tensor]) -> None:
        """One batched pass over the prompts' input rows (each [n, dim]), padded to the longest."""
        lm = self.lm
        T = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), T, rows[0].shape[1], device=self.device, dtype=self.dtype)
        for i, r in enumerate(rows):
            x[i, : r.shape[0]] = r
        lm.temporal_prefill(x, self.lm_state.kv, torch.tensor(slots, device=self.device), [r.shape[0] for r in rows])

    def _snapshot(self, slot: int, plan: PromptPlan) -> PromptState:
        kv = self.lm_state.kv
        k, v, scales = kv.read_slot(slot, min(plan.positions, kv.window))
        return PromptState(k, v, plan.tokens.clone(), plan.provided.clone(), plan.offset, len(plan.text_ids), scales)

    def _restore(self, slot: int, st: PromptState) -> None:
        self.lm_state.kv.write_slot(slot, st.k, st.v, st.scales)
        self.lm_state.load_ring(slot, st.tokens, st.provided, st.offset)

    # ------------------------------------------------------------------------------
    # the tick

    def tick(self, slots: torch.Tensor, pcm: torch.Tensor, logits: bool = False) -> StepOutput:
        """The whole per-frame step for a batch of slots, as pure tensor code (the graphs
        capture exactly this). slots: [B]; pcm: [B, frame_size]. The logits only when asked
        (tests and measurements): the served step does not copy them."""
        if self.cfg.moshi:
            return self._tick_moshi(slots, pcm, logits)
        cfg = self.cfg.lm
        off = self.lm_state.offset[slots]

        def encode_user():
            write_streams(self.lm_state, slots, self._user_streams, self._codec(self.mimi.encode, pcm, slots), off,
                          self._user_delays)

        # The user's codes of this frame land at entries the LM step neither reads nor writes
        # (it reads them first in the next frame, `lm_tick`), so on a GPU the encoder runs on a
        # side stream while the temporal transformer streams its weights; the decoder waits
        # for both. `write_streams` touches nothing but those entries: a write of every
        # stream's column there would race with the step's own writes of the frame's tokens.
        main = torch.cuda.current_stream(self.device) if self._side is not None else None
        if main is not None:
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                encode_user()
        else:
            encode_user()
        out = lm_tick(self.lm, self.lm_state, slots, None, None, self.depformer_steps, return_logits=logits)
        if main is not None:
            main.wait_stream(self._side)
        audio = self._codec(self.mimi.decode, out.tokens[:, 1:1 + cfg.agent_codebooks], slots)
        return StepOutput(audio, out.tokens, out.text_logits, out.audio_logits)

    def _tick_moshi(self, slots: torch.Tensor, pcm: torch.Tensor, logits: bool) -> StepOutput:
        """Kyutai's step: the frame's codes are the input of this very step (written at column
        offset - 1 + delay, where the step reads), so the encoder runs first; at a stream's first
        step (offset 1) the initial tokens stand instead. The decoder gets each stream's first
        frame too (`step` keeps it from the decoder; a caller of `step_tensors` gets its noise)."""
        cfg = self.cfg.lm
        off = self.lm_state.offset[slots]
        codes = self._codec(self.mimi.encode, pcm, slots)
        write_streams(self.lm_state, slots, self._user_streams, codes, off - 1, self._user_delays, where=off > 1)
        out = lm_tick(self.lm, self.lm_state, slots, None, None, self.depformer_steps, return_logits=logits)
        agent = out.tokens[:, 1:1 + cfg.agent_codebooks].clamp(0, cfg.card - 1)
        audio = self._codec(self.mimi.decode, agent, slots)
        return StepOutput(audio, out.tokens, out.text_logits, out.audio_logits)

    @torch.no_grad()
    def _first_step(self, slots: torch.Tensor, pcm: torch.Tensor | None) -> None:
        """A Moshi slot's first step, eager: the encoder takes the frame (when there is one; its
        codes are not read, the initial tokens are) and the LM steps; the acoustic delay leaves
        nothing to decode, so the decoder does not run."""
        if pcm is not None:
            self._codec(self.mimi.encode, pcm, slots)
        lm_tick(self.lm, self.lm_state, slots, None, None, self.depformer_steps)

    @torch.no_grad()
    def prime(self, slot: int) -> None:
        """A Moshi slot's first step without audio, as `moshi.run_inference` starts (it steps the
        first frame's codes twice): the next `step` answers its frame at once, so a recording's
        answer has the recording's length. PersonaPlex slots need none (their prompt phase)."""
        s = self.slots[slot]
        if not s.fresh:
            raise ValueError(f"slot {slot} has stepped already (prime only a fresh Moshi slot)")
        self._grow([slot])
        self._first_step(torch.tensor([slot], device=self.device), None)
        s.fresh = False

    def _codec(self, fn, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Mimi's `fn` (encode or decode) over the batch. On the CPU slot by slot: its BLAS rounds
        a product of several rows differently from one row's (by an ulp), which would make a
        session's audio depend on who shares its tick; on a GPU the batch as one."""
        if self.device.type != "cpu" or slots.shape[0] == 1:
            return fn(x, self.mimi_state, slots)
        return torch.cat([fn(x[i:i + 1], self.mimi_state, slots[i:i + 1]) for i in range(slots.shape[0])])

    def enable_graphs(self, buckets=None, prefill_buckets=None, logits: bool = False) -> float:
        """Captures the tick as CUDA graphs (one per batch bucket: 1, 2, 4, ... up to the slot
        count) and the prompt's prefill (one per prompt-length bucket, none past the KV window);
        logits: the tick's graphs keep the logits too. Returns seconds taken."""
        from .graphs import BucketGraphs
        from .kernels.products import calibration_stats

        if self.device.type != "cuda":
            return 0.0
        cal0 = calibration_stats()
        t0 = time.monotonic()
        sizes = sorted({b for b in (buckets or TICK_BUCKETS) if b < self.max_slots} | {self.max_slots})
        self._graph_logits = logits
        scratch = self.lm_state.scratch
        # a batch of n runs in the smallest bucket b >= n; rows n..b-1 point at the scratch slot
        reserved0 = torch.cuda.memory_reserved(self.device)
        self.graphs = BucketGraphs(
            lambda slots, pcm: self.tick(slots, pcm, logits),
            lambda b: (torch.full((b,), scratch, dtype=torch.long, device=self.device),
                       torch.zeros(b, self.frame_size, device=self.device)), sizes, warmups=2)
        log.info("warming up and capturing the tick's CUDA graphs for batch buckets %s (a first start on a machine "
                 "also compiles and times the kernels: minutes; later starts read them from disk)", sizes)

        def progress(i: int, n: int, size: int, seconds: float) -> None:
            if i:
                log.info("  batch bucket %d (%d of %d), %.0f s so far", size, i + 1, n, seconds)

        self.graphs.capture(progress=progress)
        # (the memory the capture reserved: the graphs' shared pool of activations and their buffers)
        self.graph_memory = torch.cuda.memory_reserved(self.device) - reserved0
        cal = calibration_stats()
        log.info("captured CUDA graphs for batch buckets %s in %.1f s (of which %.1f s timing the kernels for %d "
                 "products and %d with a prologue, their compilation included; %d choices read from disk); they hold "
                 "%.2f GB", sizes, time.monotonic() - t0, cal["seconds"] - cal0["seconds"],
                 cal["products"] - cal0["products"], cal["fused"] - cal0["fused"], cal["from_cache"] - cal0["from_cache"],
                 self.graph_memory / 1e9)
        self.prefill_graphs = self.prefill_graphs_for(PREFILL_BUCKETS if prefill_buckets is None else prefill_buckets)
        if self.prefill_graphs.sizes:
            t1 = time.monotonic()
            self.prefill_graphs.capture()
            sizes = self.prefill_graphs.sizes
            log.info("captured CUDA graphs of the prompt's prefill for %d lengths (%d..%d positions) in %.1f s",
                     len(sizes), sizes[0], sizes[-1], time.monotonic() - t1)
        else:
            self.prefill_graphs = None
        return time.monotonic() - t0

    def prefill_graphs_for(self, lengths):
        """The prefill over one prompt of T positions per bucket T (x [1, T, dim], slot [1]), for
        the lengths within the KV window (a longer prompt runs eagerly); not yet captured."""
        from .graphs import BucketGraphs

        dim = self.cfg.lm.temporal.dim
        # (with an e4m3 KV cache the prompt runs eagerly: its replayed prefill left other keys
        # and values than the eager pass on an H200, which the GPU test shows)
        lengths = [T for T in lengths if T <= self.lm_state.kv.window and not self.lm_state.kv.quantized]
        return BucketGraphs(
            lambda x, slot: self.lm.temporal_prefill(x, self.lm_state.kv, slot, [x.shape[1]]),
            lambda T: (torch.zeros(1, T, dim, device=self.device, dtype=self.dtype),
                       torch.full((1,), self.lm_state.scratch, dtype=torch.long, device=self.device)), lengths)

    @torch.no_grad()
    def step_tensors(self, slots: torch.Tensor, pcm: torch.Tensor, logits: bool = False) -> StepOutput:
        """slots: [B]; pcm: [B, frame_size] on the device, through the captured graphs when
        there are any (their outputs are rewritten by the next replay; logits need graphs
        captured with them, `enable_graphs(logits=True)`)."""
        if self.graphs is None:
            return self.tick(slots, pcm, logits)
        if logits and not self._graph_logits:
            raise ValueError("the tick's graphs were captured without logits: enable_graphs(logits=True)")
        n = slots.shape[0]
        b = self.graphs.bucket(n)
        if b is None:
            raise ValueError(f"{n} slots exceed the largest batch bucket {self.graphs.sizes[-1]}")
        slot_buf, pcm_buf = b.buffers
        slot_buf[:n].copy_(slots)
        slot_buf[n:].fill_(self.lm_state.scratch)
        pcm_buf[:n].copy_(pcm)
        out = self.graphs.replay(b)
        return StepOutput(*(t[:n] if t is not None else None for t in out))

    def step(self, frames: Mapping[int, np.ndarray]) -> dict[int, FrameOut]:
        """One frame of user audio per slot in, one frame of agent audio and text per slot out
        (`valid` False, silence, for a Moshi slot's first frame)."""
        if not frames:
            return {}
        slot_list = sorted(frames)
        for s in slot_list:
            if s not in self.slots:
                raise KeyError(f"slot {s} is not open")
        self._grow(slot_list)
        fresh = [s for s in slot_list if self.slots[s].fresh]
        out = {}
        if fresh:
            pcm = np.stack([np.asarray(frames[s], dtype=np.float32).reshape(self.frame_size) for s in fresh])
            self._first_step(torch.tensor(fresh, device=self.device), torch.from_numpy(pcm).to(self.device))
            for s in fresh:
                self.slots[s].fresh = False
                self.slots[s].frames += 1
                tokens = np.full(self.cfg.lm.num_streams, -1, dtype=np.int64)
                out[s] = FrameOut(pcm=np.zeros(self.frame_size, np.float32), text_id=TEXT_PAD, tokens=tokens,
                                  valid=False)
            slot_list = [s for s in slot_list if s not in out]
            if not slot_list:
                return out
        pcm = np.stack([np.asarray(frames[s], dtype=np.float32).reshape(self.frame_size) for s in slot_list])
        res = self.step_tensors(torch.tensor(slot_list, device=self.device), torch.from_numpy(pcm).to(self.device))
        audio, tokens = res.audio, res.tokens
        if self._tick_done is not None:
            # wait with the GIL released, so a server's other threads run during the tick
            self._tick_done.record(torch.cuda.current_stream(self.device))
            self._tick_done.synchronize()
        audio, tokens = audio.cpu().numpy(), tokens.cpu().numpy()
        for i, s in enumerate(slot_list):
            self.slots[s].frames += 1
            out[s] = FrameOut(pcm=audio[i], text_id=int(tokens[i, 0]), tokens=tokens[i])
        return out


def resolve_config(config: ModelConfig | str | None = None, moshi_weight=None,
                   hf_repo: str = W.DEFAULT_HF_REPO) -> ModelConfig:
    """The model's config: `config` (a ModelConfig, or a JSON file with the reference's names)
    when given; else the 7B's, PersonaPlex's, or Moshi's when the checkpoint's depformer has 8
    steps (Kyutai's checkpoints). Finding the checkpoint may fetch it from the hub."""
    if isinstance(config, ModelConfig):
        return config
    if config is not None:
        return load_config(config)
    path = W.resolve_file(moshi_weight, W.LM_FILE, hf_repo)
    if W.depformer_steps(path) == MOSHI_7B.lm.depformer.steps:
        return MOSHI_7B
    return PERSONAPLEX_7B


def kv_position_bytes(cfg: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str | None = None) -> int:
    """Bytes of one position's keys and values over all layers (and their scales in e4m3)."""
    t = cfg.lm.temporal
    vectors = 2 * t.num_layers * t.num_heads
    return vectors * (t.head_dim + 4 if kv_cache_dtype == "fp8" else t.head_dim * torch.finfo(dtype).bits // 8)


def kv_pages_that_fit(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, page: int,
                      kv_cache_dtype: str | None = None, slots: int = MAX_SLOTS, headroom: int = 6 << 30) -> int:
    """KV pages of `page` positions that the free GPU memory holds, keeping headroom for the
    tick's activations at `slots` rows, the graphs and the prompt cache."""
    free, _ = torch.cuda.mem_get_info(device)
    headroom += slots * (24 << 20)
    return max(1, int((free - headroom) // (page * kv_position_bytes(cfg, dtype, kv_cache_dtype))))


# a session of this many frames (one minute) and its prompt: what the default slot count plans for
PLANNED_SESSION_FRAMES = 750 + 400
