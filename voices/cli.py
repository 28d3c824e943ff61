"""`ppx-voice`: list a voice directory, or make a `.pt` voice prompt from a recording."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from frontends.common import add_model_args, die, load_engine, model_config, run_main, setup_logging
from .library import VOICE_EXTS, VoiceLibrary, hub_voice_dir, load_voice


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ppx-voice", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list the voices of a directory (the hub repository's when none is given)")
    ls.add_argument("--voice-prompt-dir", type=str)
    ls.add_argument("--hf-repo", type=str, default=None)
    mk = sub.add_parser("make", help="make a .pt voice prompt from a recording")
    mk.add_argument("input", type=str, help="a recording of the voice (WAV, FLAC, ...), a few seconds long")
    mk.add_argument("--output", "-o", type=str, required=True, help="the .pt file to write")
    add_model_args(mk)
    args = ap.parse_args(argv)
    setup_logging()

    def run():
        if args.cmd == "list":
            from engine.weights import DEFAULT_HF_REPO
            d = args.voice_prompt_dir or hub_voice_dir(args.hf_repo or DEFAULT_HF_REPO)
            names = VoiceLibrary(d).names()
            if not names:
                die(f"'{d}' holds no voice prompts (.pt files in the reference's format, or recordings: "
                    f"{', '.join(VOICE_EXTS)})")
            for name in names:
                print(name)
            return 0
        out = Path(args.output)
        if out.suffix != ".pt":
            die(f"the output '{out}' must end in .pt")
        cfg = model_config(args)
        if cfg.moshi:
            die("this is a Moshi checkpoint, which takes no voice prompt: it speaks in its own voice")
        engine = load_engine(args, cfg, max_slots=1)
        from engine.prompts import save_voice_pt
        voice = engine.voice_embeddings(load_voice(args.input, engine))
        save_voice_pt(voice, out)
        print(f"wrote {out} ({voice.embeddings.shape[0]} frames)")
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
