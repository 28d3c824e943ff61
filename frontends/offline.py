"""`ppx-offline`: the user's recording in, the agent's audio (WAV) and text (JSON) out.

The same computation as the reference's `python -m moshi.offline`: the prompt phase, then one
model step per 80 ms frame of the input; the output WAV has the input's exact length.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from engine.config import DEFAULT_TEXT_PROMPT
from engine.errors import UserError
from engine.sampling import SAMPLING_DEFAULTS
from .common import add_model_args, load_engine, model_config, run_main, setup_logging

log = logging.getLogger("ppx.offline")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ppx-offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-wav", required=True, type=str, help="the user's audio (WAV or any libsndfile format)")
    ap.add_argument("--output-wav", required=True, type=str, help="where to write the agent's audio (24 kHz mono)")
    ap.add_argument("--output-text", required=True, type=str, help="where to write the agent's text (JSON list)")
    ap.add_argument("--text-prompt", type=str, default=DEFAULT_TEXT_PROMPT, help="the role prompt")
    ap.add_argument("--voice-prompt", required=True, type=str,
                    help="a voice name in --voice-prompt-dir (NATF2 or NATF2.pt), or a .pt or WAV file")
    ap.add_argument("--voice-prompt-dir", type=str,
                    help="directory of voice prompts (default: the hub repo's voices.tgz, fetched once)")
    add_model_args(ap)
    s = ap.add_argument_group("sampling")
    s.add_argument("--seed", type=int, default=-1, help="seed for reproducible sampling (-1: random)")
    d = SAMPLING_DEFAULTS
    s.add_argument("--temp-audio", type=float, default=d.temp_audio, help=f"audio temperature (default {d.temp_audio})")
    s.add_argument("--temp-text", type=float, default=d.temp_text, help=f"text temperature (default {d.temp_text})")
    s.add_argument("--topk-audio", type=int, default=d.topk_audio, help=f"audio top-k (default {d.topk_audio})")
    s.add_argument("--topk-text", type=int, default=d.topk_text, help=f"text top-k (default {d.topk_text})")
    s.add_argument("--greedy", action="store_true", help="take the most likely token instead of sampling")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _check_writable(path: str) -> Path:
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write '{p}': directory '{parent}' does not exist")
    if p.is_dir():
        raise UserError(f"cannot write '{p}': it is a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write '{p}': directory '{parent}' is not writable")
    return p


def run(args) -> int:
    from engine.audio import AudioError, first_channel, frames, read_audio, write_wav
    from engine.sampling import SamplingParams
    from voices import encode_voice, read_voice, resolve_voice_arg

    # Everything that can be checked without the model is checked before it loads (a minute
    # for the 7B): the outputs, the input recording, the voice and the sampling settings.
    cfg = model_config(args)
    out_wav, out_text = _check_writable(args.output_wav), _check_writable(args.output_text)
    audio = read_audio(args.input_wav, cfg.mimi.sample_rate)
    if audio.shape[0] > 1:
        log.info("the input has %d channels: using the first, as the reference does", audio.shape[0])
    user = first_channel(audio)
    total = user.shape[0]
    if total == 0:
        raise AudioError(f"'{args.input_wav}' holds no audio samples")
    voice_path = resolve_voice_arg(args.voice_prompt, args.voice_prompt_dir, args.hf_repo)
    voice_read = read_voice(voice_path, cfg)
    sampling = SamplingParams(temp_text=args.temp_text, temp_audio=args.temp_audio, topk_text=args.topk_text,
                              topk_audio=args.topk_audio, greedy=args.greedy, seed=args.seed)
    sampling.validate()
    engine = load_engine(args, cfg, max_slots=1)
    voice = encode_voice(voice_read, engine, voice_path.stem)
    t0 = time.monotonic()
    slot = engine.open(voice, args.text_prompt, sampling)
    log.info("prompt phase: voice '%s', %d prompt tokens, %.0f ms", voice.name,
             engine.slots[slot].prompt_tokens, 1000 * (time.monotonic() - t0))

    chunks = frames(user, engine.frame_size)
    pcm_out, text_out = [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chunks), unit="frame", disable=args.no_progress or None, file=sys.stderr,
               desc="generating")
    start = time.monotonic()
    for i, chunk in enumerate(chunks):
        out = engine.step({slot: chunk})[slot]
        pcm_out.append(out.pcm)
        text_out.append(engine.tokenizer.json_piece(out.text_id))
        elapsed = time.monotonic() - start
        bar.update(1)
        if elapsed > 0:
            bar.set_postfix(rtf=f"{(i + 1) * engine.frame_size / engine.sample_rate / elapsed:.2f}x")
    bar.close()
    engine.close(slot)
    elapsed = time.monotonic() - start
    pcm = np.concatenate(pcm_out)[:total]
    write_wav(out_wav, pcm, engine.sample_rate)
    with open(out_text, "w", encoding="utf-8") as f:
        json.dump(text_out, f, ensure_ascii=False)
    log.info("%d frames in %.1f s (%.2fx real time); wrote %s and %s", len(chunks), elapsed,
             len(chunks) * engine.frame_size / engine.sample_rate / max(elapsed, 1e-9), out_wav, out_text)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
