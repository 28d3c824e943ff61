"""One frame of the language model for a batch of slots, as the reference's generator does it.

The token ring of a slot is the reference's `cache[17, max_delay + 3]` with its `provided`
mask and `offset` o. A step at offset o (o >= 1):
  1. writes the given tokens of stream k at column (o + delay_k) mod R;
  2. runs the temporal transformer on column o - 1 (position o - 1) and predicts column o:
     the text token, then the depformer's codebooks one by one, each teacher-forced with the
     given token wherever column o holds a provided one;
  3. clears `provided` of column o - 1, writes the sampled tokens where column o was not
     provided, and returns column o - max_delay read with each stream's delay (one frame late).
Everything is tensor code over the batch, with no host synchronisation, so it can be captured
in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.sampling import sample_tokens
from .lm import LM
from .state import LMState


@dataclass
class TickOutput:
    tokens: torch.Tensor          # [B, 17] the frame o - max_delay (valid where `valid`)
    valid: torch.Tensor           # [B] bool: False for the first max_delay steps of a stream
    text_logits: torch.Tensor | None = None   # [B, text_card] float32
    audio_logits: torch.Tensor | None = None  # [B, steps, card] float32


def write_given(state: LMState, slots: torch.Tensor, given: torch.Tensor, mask: torch.Tensor,
                off: torch.Tensor | None = None) -> None:
    """Writes given tokens ([B, 17], where mask [B, 17]) at column offset + delay of their
    stream (off: the slots' offsets, when already read). It rewrites every stream's entry
    (unmasked ones with their old value), so it must not run beside a step of the same slots:
    `write_streams` touches only the streams it writes."""
    B, K = given.shape
    R = state.tokens.shape[2]
    off = state.offset[slots] if off is None else off
    s = slots.view(B, 1).expand(B, K)
    k = torch.arange(K, device=given.device).view(1, K).expand(B, K)
    cols = (off.view(B, 1) + state.delays.view(1, K)) % R
    state.tokens[s, k, cols] = torch.where(mask, given, state.tokens[s, k, cols])
    state.provided[s, k, cols] = state.provided[s, k, cols] | mask


def write_streams(state: LMState, slots: torch.Tensor, streams: torch.Tensor, tokens: torch.Tensor,
                  off: torch.Tensor, delays: torch.Tensor | None = None, where: torch.Tensor | None = None) -> None:
    """Writes tokens [B, n] of the streams `streams` ([n]) at column off + delay of each, marked
    provided, and touches no other entry: the engine's encoder writes the user's codes this way
    on its own stream while the step runs, which reads and writes only other entries. delays:
    those streams' (`state.delays[streams]`), when picked once beforehand; where: [B] bool, the
    rows to write (the others keep their entries)."""
    B, n = tokens.shape
    R = state.tokens.shape[2]
    s = slots.view(B, 1).expand(B, n)
    k = streams.view(1, n).expand(B, n)
    delays = state.delays[streams] if delays is None else delays
    cols = (off.view(B, 1) + delays.view(1, n)) % R
    if where is None:
        state.tokens[s, k, cols] = tokens
        state.provided[s, k, cols] = torch.ones_like(tokens, dtype=torch.bool)
    else:
        w = where.view(B, 1).expand(B, n)
        state.tokens[s, k, cols] = torch.where(w, tokens, state.tokens[s, k, cols])
        state.provided[s, k, cols] = state.provided[s, k, cols] | w


def write_initial(state: LMState, slots: torch.Tensor, off: torch.Tensor | None = None) -> None:
    """Writes the initial token at column offset of every stream whose delay has not elapsed
    yet (the reference's first steps). At the offsets a step runs at (>= 1) only streams with
    a delay >= 1 can need it (`start_stream` sets column 0 of every stream itself), and only
    theirs are touched: `write_given` and `write_streams` write those at offset + delay, never
    at offset, so the two commute and may run at the same time."""
    ks = state.delayed_streams
    K = ks.shape[0]
    B = slots.shape[0]
    R = state.tokens.shape[2]
    off = state.offset[slots] if off is None else off
    s = slots.view(B, 1).expand(B, K)
    k = ks.view(1, K).expand(B, K)
    init = off.view(B, 1) <= state.delayed_delays.view(1, K)
    col0 = (off % R).view(B, 1).expand(B, K)
    state.tokens[s, k, col0] = torch.where(init, state.delayed_initial.view(1, K), state.tokens[s, k, col0])
    state.provided[s, k, col0] = state.provided[s, k, col0] | init


def start_stream(state: LMState, slots: torch.Tensor, given: torch.Tensor, mask: torch.Tensor) -> None:
    """The reference's step at offset 0: writes the given tokens, sets column 0 to the initial
    tokens and runs no model. Only a prompt stepped frame by frame starts this way; the
    engine's prefill leaves slots past it."""
    write_given(state, slots, given, mask)
    write_initial(state, slots)
    state.tokens[slots, :, 0] = state.initial.view(1, -1)
    state.offset[slots] = 1


def lm_tick(model: LM, state: LMState, slots: torch.Tensor, given: torch.Tensor | None, mask: torch.Tensor | None,
            depformer_steps: int, return_logits: bool = False,
            input_embeddings: torch.Tensor | None = None) -> TickOutput:
    """One step for every slot in `slots` ([B], distinct except for the scratch row; every
    offset >= 1). given/mask: [B, 17] tokens to write (in a conversation: the user's 8
    codebooks), or None when the caller writes them itself with `write_given` at the offsets
    this step starts from. `input_embeddings` [B, dim] replaces the embedded input column, as
    the reference's `step_embeddings` does for a voice prompt's saved embeddings.

    The step reads column o - 1 (the input) and, for the streams it predicts (text and the
    agent's codebooks), column o; it writes those streams at column o and clears `provided` at
    o - 1. Given tokens of the other streams land at o + delay and are first read by the next
    step, so a caller may write the user's codes while this step runs (`Engine.tick` does)."""
    cfg = model.cfg
    B = slots.shape[0]
    K = state.tokens.shape[1]
    n = 1 + depformer_steps
    R = state.tokens.shape[2]
    off = state.offset[slots]
    if given is not None:
        write_given(state, slots, given, mask, off)
    write_initial(state, slots, off)

    s = slots.view(B, 1).expand(B, K)
    k = torch.arange(K, device=slots.device).view(1, K).expand(B, K)
    in_col = state.tokens[s, k, ((off - 1) % R).view(B, 1).expand(B, K)]
    tgt_idx = (off % R).view(B, 1).expand(B, n)
    target = state.tokens[s[:, :n], k[:, :n], tgt_idx]
    prov = state.provided[s[:, :n], k[:, :n], tgt_idx]

    x = model.embed(in_col) if input_embeddings is None else input_embeddings.to(state.kv.k.dtype)
    h = model.temporal_decode(x, state.kv, slots, off - 1)
    # Each sampler writes its stream's token of column o into `col`, or the provided one
    # where column o holds it (teacher forcing); that token feeds the next depformer step.
    col = torch.empty(B, n, dtype=torch.long, device=slots.device)
    text_logits = model.text_logits(h)
    sample_tokens(text_logits, state.temp_text[slots], state.topk_text[slots], state.greedy[slots],
                  state.seed_text[slots], off, stream=0, forced=target[:, 0], forced_mask=prov[:, 0], out=col[:, 0])

    temp_a, topk_a = state.temp_audio[slots], state.topk_audio[slots]
    greedy, seed = state.greedy[slots], state.seed_audio[slots]
    dep_kv = model.depformer_cache(B, depformer_steps, slots.device)
    dep_in = model.depformer_inputs(h, depformer_steps)
    audio_logits = []
    for step in range(depformer_steps):
        logits = model.depformer_step(step, dep_in[:, step], col[:, step], dep_kv)
        sample_tokens(logits, temp_a, topk_a, greedy, seed, off, stream=1 + step, forced=target[:, 1 + step],
                      forced_mask=prov[:, 1 + step], out=col[:, 1 + step])
        if return_logits:
            audio_logits.append(logits)

    # Clear the consumed column, then write the predicted streams of column o.
    # (a tensor, not a Python False: a scalar here would be a host copy inside a CUDA graph)
    state.provided[s, k, ((off - 1) % R).view(B, 1).expand(B, K)] = torch.zeros_like(in_col, dtype=torch.bool)
    state.tokens[s[:, :n], k[:, :n], tgt_idx] = col

    out_cols = ((off - cfg.max_delay).view(B, 1) + state.delays.view(1, K)) % R
    out = state.tokens[s, k, out_cols]
    state.offset[slots] = off + 1
    return TickOutput(
        tokens=out,
        valid=off > cfg.max_delay,
        text_logits=text_logits.float() if return_logits else None,
        audio_logits=torch.stack(audio_logits, dim=1).float() if return_logits else None,
    )


def user_mask(cfg, batch: int, device) -> torch.Tensor:
    """The given-mask of a conversation frame: the user's codebooks only."""
    m = torch.zeros(batch, cfg.num_streams, dtype=torch.bool, device=device)
    m[:, 1 + cfg.agent_codebooks:] = True
    return m


def user_streams(cfg, device) -> torch.Tensor:
    """The user's codebooks' stream indices."""
    return torch.arange(1 + cfg.agent_codebooks, cfg.num_streams, device=device)


def teacher_force(dst: LMState, dslot: int, src: LMState, sslot: int, offset: int) -> None:
    """Makes dst's token ring src's after src's step at `offset`, with that column marked
    provided, so dst's next step re-predicts it from the same inputs, its depformer fed src's
    tokens at every step (for comparing two runs frame by frame; each keeps its KV rings)."""
    R = dst.tokens.shape[2]
    dst.tokens[dslot] = src.tokens[sslot]
    dst.provided[dslot] = src.provided[sslot]
    dst.provided[dslot, :, offset % R] = True
    dst.offset[dslot] = offset
