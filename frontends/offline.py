"""`ppx-offline`: recordings of the user in, the agent's audio (WAV) and text (JSON) out.

One file (`--input-wav`) is the reference's `python -m moshi.offline`: the prompt phase, then one
model step per 80 ms frame of the input; the output WAV has the input's exact length. Many files
(`--input-dir` or `--manifest`) run as slots of one engine, up to `--batch-size` at once, each
new item taking a slot as soon as one frees; each item's outputs are those a one-file run with
the same settings writes (on the CPU byte for byte; on a GPU batched products round differently
from one row's, so long sampled runs may part). A bad item is reported and skipped.

A Moshi checkpoint (Kyutai's moshiko, moshika: recognised from its depformer of 8 steps) takes no
voice or role prompt and runs as `python -m moshi.run_inference` does: the first frame is stepped
twice (once to start, once for its answer), so the output has the input's length.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.sampling import SAMPLING_DEFAULTS, SamplingParams
from .common import add_model_args, load_engine, model_config, resolve_device, run_main, setup_logging

log = logging.getLogger("ppx.offline")

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
CPU_BATCH = 4  # items at once on the CPU by default (a batch there saves little: the CPU is the limit)
# a manifest line's settings, with the SamplingParams field each sets
SAMPLING_KEYS = {"seed": "seed", "temp_text": "temp_text", "temp_audio": "temp_audio", "topk_text": "topk_text",
                 "topk_audio": "topk_audio", "greedy": "greedy"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ppx-offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("inputs and outputs (one file, a folder, or a manifest)")
    io.add_argument("--input-wav", type=str, help="the user's audio (WAV or any libsndfile format)")
    io.add_argument("--output-wav", type=str, help="where to write the agent's audio (24 kHz mono)")
    io.add_argument("--output-text", type=str, help="where to write the agent's text (JSON list)")
    io.add_argument("--input-dir", type=str, help="every recording under this folder: IN/a/b.wav gives OUT/a/b.wav "
                                                  "and OUT/a/b.json")
    io.add_argument("--manifest", type=str,
                    help="a JSONL file, one item per line: {\"input\": ..., \"output_wav\": ..., \"output_text\": ..., "
                         "and optionally \"voice_prompt\", \"text_prompt\", \"seed\", \"temp_text\", \"temp_audio\", "
                         "\"topk_text\", \"topk_audio\", \"greedy\"}; paths relative to the manifest's folder "
                         "(outputs default to --output-dir/<input's name>)")
    io.add_argument("--output-dir", type=str, help="where the outputs of --input-dir (or --manifest) go")
    io.add_argument("--batch-size", type=int, default=None,
                    help="items run at once (default: as many as the GPU memory holds, at most 64; 4 on the CPU)")
    io.add_argument("--resume", action="store_true", help="skip items whose two outputs already exist")
    io.add_argument("--stereo-output", action="store_true",
                    help="write the user's input as channel 0 and the agent as channel 1 (Full-Duplex-Bench's layout)")
    ap.add_argument("--text-prompt", type=str, default=None,
                    help="the role prompt (default: a friendly teacher's; a Moshi checkpoint takes none)")
    ap.add_argument("--voice-prompt", type=str,
                    help="a voice name in --voice-prompt-dir (NATF2 or NATF2.pt), or a .pt or WAV file (needed, "
                         "except for a Moshi checkpoint, which takes none)")
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


@dataclass
class Item:
    """One recording to answer, and where the answer goes."""
    name: str                # how messages name it
    input: Path
    output_wav: Path
    output_text: Path
    voice: str | None
    text_prompt: str | None
    sampling: SamplingParams
    seconds: float = 0.0     # the input's length (read before the model loads)
    error: str | None = None


def _check_writable(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write '{path}': directory '{parent}' does not exist")
    if path.is_dir():
        raise UserError(f"cannot write '{path}': it is a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write '{path}': directory '{parent}' is not writable")
    return path


def _sampling(args) -> SamplingParams:
    return SamplingParams(temp_text=args.temp_text, temp_audio=args.temp_audio, topk_text=args.topk_text,
                          topk_audio=args.topk_audio, greedy=args.greedy, seed=args.seed)


def items_from_args(args) -> list[Item]:
    """The run's items: one file, every recording under a folder, or a manifest's lines (a line
    that cannot be read becomes an item that failed, so the rest still run)."""
    modes = [m for m in ("input_wav", "input_dir", "manifest") if getattr(args, m)]
    if len(modes) != 1:
        raise UserError("give one of --input-wav (with --output-wav and --output-text), --input-dir (with "
                        "--output-dir) or --manifest")
    base = _sampling(args)
    if args.input_wav:
        if not (args.output_wav and args.output_text):
            raise UserError("--input-wav needs --output-wav and --output-text")
        return [Item(args.input_wav, Path(args.input_wav), Path(args.output_wav), Path(args.output_text),
                     args.voice_prompt, args.text_prompt, base)]
    out_dir = Path(args.output_dir) if args.output_dir else None
    if args.input_dir:
        if out_dir is None:
            raise UserError("--input-dir needs --output-dir")
        root = Path(args.input_dir)
        if not root.is_dir():
            raise UserError(f"input folder '{root}' does not exist")
        skip = out_dir.resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                       and skip not in p.resolve().parents)
        if not files:
            raise UserError(f"'{root}' holds no recordings ({', '.join(AUDIO_SUFFIXES)})")
        return [Item(str(p.relative_to(root)), p, (out_dir / p.relative_to(root)).with_suffix(".wav"),
                     (out_dir / p.relative_to(root)).with_suffix(".json"), args.voice_prompt, args.text_prompt, base)
                for p in files]
    return _manifest_items(Path(args.manifest), out_dir, args, base)


def _manifest_items(path: Path, out_dir: Path | None, args, base: SamplingParams) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the manifest '{path}' ({e.__class__.__name__})") from None
    here = path.parent
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name = f"{path.name} line {n}"
        try:
            d = json.loads(line)
            if not isinstance(d, dict) or not isinstance(d.get("input"), str):
                raise ValueError("a JSON object with an \"input\" path is needed")
            inp = here / d["input"]
            given = Path(d["input"])  # (a relative input keeps its folders under --output-dir)
            stem = (given if not given.is_absolute() and ".." not in given.parts else Path(given.name)).with_suffix("")
            if out_dir is None and not ("output_wav" in d and "output_text" in d):
                raise ValueError("no output_wav and output_text, and no --output-dir")
            wav = here / d["output_wav"] if "output_wav" in d else out_dir / stem.with_suffix(".wav")
            text = here / d["output_text"] if "output_text" in d else out_dir / stem.with_suffix(".json")
            unknown = set(d) - {"input", "output_wav", "output_text", "voice_prompt", "text_prompt", *SAMPLING_KEYS}
            if unknown:
                raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
            sampling = replace(base, **{SAMPLING_KEYS[k]: d[k] for k in SAMPLING_KEYS if k in d})
            voice, prompt = d.get("voice_prompt", args.voice_prompt), d.get("text_prompt", args.text_prompt)
            if not all(v is None or isinstance(v, str) for v in (voice, prompt)):
                raise ValueError("voice_prompt and text_prompt must be strings")
            items.append(Item(f"{name} ({d['input']})", inp, wav, text, voice, prompt, sampling))
        except (ValueError, TypeError) as e:
            items.append(Item(name, path, path, path, "", "", base, error=f"not a valid item: {e}"))
    if not items:
        raise UserError(f"the manifest '{path}' holds no items")
    return items


def check_item(item: Item, batch: bool) -> None:
    """What can be known of an item before the model loads: its input is a readable recording,
    its outputs can be written (in a batch, their folders are made), its settings are valid."""
    import soundfile as sf

    from engine.audio import AudioError

    item.sampling.validate()
    if not item.input.exists():
        raise AudioError(f"'{item.input}' does not exist")
    if not item.input.is_file():
        raise AudioError(f"'{item.input}' is not a file")
    try:
        info = sf.info(str(item.input))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"'{item.input}' is not a readable audio file ({e})") from None
    if info.frames == 0:
        raise AudioError(f"'{item.input}' holds no audio samples")
    item.seconds = info.frames / info.samplerate
    for out in (item.output_wav, item.output_text):
        if batch:
            out.parent.mkdir(parents=True, exist_ok=True)
        _check_writable(out)


@dataclass
class _Running:
    item: Item
    user: np.ndarray          # [T] the input's first channel at 24 kHz
    chunks: np.ndarray        # [frames, frame_size]
    t: int = 0
    pcm: list = field(default_factory=list)
    text: list = field(default_factory=list)


def run_items(engine, items: list[Item], voices: dict, stereo: bool, progress: bool) -> list[Item]:
    """Runs the items as slots of `engine`, a new one opening as soon as one ends; writes each
    one's outputs as it ends. Returns the items that failed (with their error)."""
    from tqdm.auto import tqdm

    from engine.audio import first_channel, frames, read_audio, write_wav

    pending = collections.deque(items)
    running: dict[int, _Running] = {}
    failed: list[Item] = []
    total = sum(i.seconds for i in items)
    bar = tqdm(total=round(total, 1), unit="s", unit_scale=False, disable=not progress or None, file=sys.stderr,
               desc="audio", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
    done, start, heard = 0, time.monotonic(), 0.0
    frame_s = engine.frame_size / engine.sample_rate
    while pending or running:
        while pending and len(running) < engine.max_slots:
            item = pending.popleft()
            try:
                voice = voices.get(item.voice)
                if isinstance(voice, UserError):
                    raise voice
                audio = read_audio(item.input, engine.sample_rate)
                user = first_channel(audio)
                # one prompt at a time: a prompt's prefill is then the one a one-file run makes
                slot = engine.open(voice, item.text_prompt, item.sampling)
                if engine.cfg.moshi:
                    engine.prime(slot)  # (moshi.run_inference's double first step)
            except UserError as e:
                item.error = str(e)
                failed.append(item)
                log.warning("%s: %s", item.name, e)
                continue
            running[slot] = _Running(item, user, frames(user, engine.frame_size))
        if not running:
            continue
        outs = engine.step({slot: r.chunks[r.t] for slot, r in running.items()})
        for slot, out in outs.items():
            r = running[slot]
            r.pcm.append(out.pcm)
            r.text.append(engine.tokenizer.json_piece(out.text_id))
            r.t += 1
            if r.t < len(r.chunks):
                continue
            engine.close(slot)
            del running[slot]
            agent = np.concatenate(r.pcm)[: r.user.shape[0]]
            try:
                write_wav(r.item.output_wav, np.stack([r.user, agent], axis=1) if stereo else agent,
                          engine.sample_rate)
                with open(r.item.output_text, "w", encoding="utf-8") as f:
                    json.dump(r.text, f, ensure_ascii=False)
                done += 1
            except (UserError, OSError) as e:
                r.item.error = str(e)
                failed.append(r.item)
                log.warning("%s: %s", r.item.name, e)
        heard += len(outs) * frame_s
        elapsed = time.monotonic() - start
        bar.n = min(round(heard, 1), bar.total)
        bar.set_postfix_str(f"items {done + len(failed)}/{len(items)}, {heard / max(elapsed, 1e-9):.1f}x real time",
                            refresh=False)
        bar.refresh()
    bar.close()
    return failed


def run(args) -> int:
    from voices import read_voice, resolve_voice_arg

    # Everything that can be checked without the model is checked before it loads (a minute
    # for the 7B): the inputs, the outputs, the voices and the sampling settings.
    items = items_from_args(args)
    batch = not args.input_wav
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    skipped = 0
    if args.resume:
        kept = [i for i in items if not (i.error is None and i.output_wav.is_file() and i.output_text.is_file())]
        skipped, items = len(items) - len(kept), kept
    failed = []
    for item in items:
        if item.error is None:
            try:
                check_item(item, batch)
            except UserError as e:
                if not batch:
                    raise
                item.error = str(e)
        if item.error is not None:
            failed.append(item)
            log.warning("%s: %s", item.name, item.error)
    cfg = model_config(args)
    for item in items:
        if item.error is None:
            item.error = _prompt_error(item, cfg)
            if item.error is not None:
                if not batch:
                    raise UserError(item.error)
                failed.append(item)
                log.warning("%s: %s", item.name, item.error)
    todo = [i for i in items if i.error is None]
    voices: dict = {}
    for name in sorted({i.voice for i in todo if i.voice is not None}):
        try:
            path = resolve_voice_arg(name, args.voice_prompt_dir, args.hf_repo)
            voices[name] = (path, read_voice(path, cfg))
        except UserError as e:
            if not batch:
                raise
            voices[name] = e
    if not todo:
        return _summary(items, failed, skipped, 0.0, 0.0)

    from voices import encode_voice

    if not batch:
        slots = 1
    elif args.batch_size is not None:
        slots = min(args.batch_size, len(todo))
    else:  # as many as fit on a GPU, at most the items
        slots = None if resolve_device(args.device).type == "cuda" else min(CPU_BATCH, len(todo))
    engine = load_engine(args, cfg, max_slots=slots, most_slots=len(todo))
    ready = {name: v if isinstance(v, UserError) else encode_voice(v[1], engine, v[0].stem) for name, v in voices.items()}
    t0 = time.monotonic()
    failed += run_items(engine, todo, ready, args.stereo_output, not args.no_progress)
    wall = time.monotonic() - t0
    seconds = sum(i.seconds for i in todo if i.error is None)
    if not batch:
        if failed:
            raise UserError(failed[0].error)
        log.info("%.1f s of audio in %.1f s (%.2fx real time); wrote %s and %s", seconds, wall,
                 seconds / max(wall, 1e-9), todo[0].output_wav, todo[0].output_text)
        return 0
    return _summary(items, failed, skipped, seconds, wall, engine.max_slots)


def _prompt_error(item: Item, cfg) -> str | None:
    """What is wrong with an item's voice and role prompt for this model, if anything."""
    if cfg.moshi:
        given = [f for f, v in (("--voice-prompt", item.voice), ("--text-prompt", item.text_prompt)) if v is not None]
        if given:
            return (f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} PersonaPlex's: this Moshi checkpoint "
                    f"takes no voice or role prompt (it starts every conversation from its initial tokens)")
        return None
    if item.voice is None:
        return "--voice-prompt is needed: a voice name (NATF2), or a .pt or WAV file"
    return None


def _summary(items: list[Item], failed: list[Item], skipped: int, seconds: float, wall: float, batch: int = 0) -> int:
    ok = len(items) - len(failed)
    rate = f", {seconds / wall:.1f}x real time" if wall > 0 else ""
    print(f"{ok} of {len(items)} items done{f' ({skipped} skipped: their outputs exist)' if skipped else ''}: "
          f"{seconds / 3600:.3f} h of audio in {wall:.1f} s{rate}" + (f", {batch} at a time" if batch else ""),
          file=sys.stderr)
    if failed:
        print(f"{len(failed)} failed:", file=sys.stderr)
        for item in failed:
            print(f"  {item.name}: {item.error}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
