"""The demo: a model a newcomer can run without `HF_TOKEN` or a GPU, and `make demo`.

`demo_model()` writes a tiny model with random weights in the real checkpoint formats (the
same loading code serves it and the 7B), with the project's own small tokenizer and a voice
made from a recording that ship in `demo_assets/`. Its output is noise, not speech: it shows
the product working, not the model. `ppx-serve --demo` serves it; `make demo` runs
`ppx-offline` on a recording with the real 7B when `HF_TOKEN` grants it and a GPU is present,
and with this model otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "demo_assets"
DEMO_SEED = 0
DEMO_VOICE = "DEMO0"
NOISE_NOTE = "its output is noise, not speech"


def demo_model(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """The tiny random model's files (`lm`, `mimi`, `tokenizer`, `config`) and a voice directory
    (`voices`, holding DEMO0.wav), written once into `directory` (default: the cache)."""
    from engine.config import TINY
    from engine.random_weights import write_random_model
    from engine.weights import LM_FILE, MIMI_FILE, TOKENIZER_FILE

    from .common import cache_dir

    d = Path(directory) if directory is not None else cache_dir() / f"demo-tiny-seed{DEMO_SEED}"
    paths = {"lm": d / LM_FILE, "mimi": d / MIMI_FILE, "tokenizer": d / TOKENIZER_FILE,
             "config": d / "config.json", "voices": d / "voices"}
    if all(p.exists() for p in paths.values()):
        return paths
    d.parent.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed, so an interrupted write never leaves half a model
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=d.parent))
    try:
        write_random_model(tmp, TINY, seed=DEMO_SEED, tokenizer=ASSETS / "tokenizer.model")
        (tmp / "voices").mkdir()
        shutil.copy(ASSETS / "voice.wav", tmp / "voices" / f"{DEMO_VOICE}.wav")
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def demo_model_args(paths: dict[str, Path]) -> list[str]:
    """The model flags of `ppx-offline` and `ppx-serve` for the demo model, on the CPU."""
    return ["--moshi-weight", str(paths["lm"]), "--mimi-weight", str(paths["mimi"]),
            "--tokenizer", str(paths["tokenizer"]), "--config", str(paths["config"]), "--device", "cpu"]


# ------------------------------------------------------------------------------------------
# make demo

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "data" / "golden" / "tiny-1234"
OUT = ROOT / "artifacts" / "demo"
REAL_VOICE = "NATF2"


def _real_model_reason() -> str | None:
    """None when the real model can run here, else why not."""
    import torch

    from engine.errors import UserError
    from engine.hub import hub_file, token
    from engine.weights import DEFAULT_HF_REPO

    if not token():
        return "HF_TOKEN is not set"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU (the 7B model needs one)"
    try:
        hub_file(DEFAULT_HF_REPO, "config.json")
    except UserError as e:
        return str(e)
    return None


def main() -> int:
    from frontends.offline import main as offline

    if not SAMPLES.is_dir():
        print(f"error: `make demo` runs from the project's source tree ({SAMPLES} is missing)", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    recording = SAMPLES / "input.wav"
    prompt = json.loads((SAMPLES / "config.json").read_text())["text_prompt"]
    common = ["--input-wav", str(recording), "--output-wav", str(OUT / "agent.wav"),
              "--output-text", str(OUT / "agent.json"), "--text-prompt", prompt, "--seed", "42"]
    reason = _real_model_reason()
    if reason is None:
        print("== PersonaPlex 7B (real weights from the hub) ==", flush=True)
        voice = REAL_VOICE
        args = common + ["--voice-prompt", voice]
    else:
        print(f"== {reason}: running a TINY RANDOM model in the real checkpoint format ==\n"
              f"   ({NOISE_NOTE}; with HF_TOKEN for nvidia/personaplex-7b-v1 and a GPU,\n"
              "    `make demo` runs the real model)", flush=True)
        paths = demo_model()
        voice = str(paths["voices"] / f"{DEMO_VOICE}.wav")
        args = common + ["--voice-prompt", voice] + demo_model_args(paths)
    print(f"   input recording: {recording}\n   voice prompt:    {voice}\n   role prompt:     {prompt!r}",
          flush=True)
    rc = offline(args)
    if rc == 0:
        text = "".join(t for t in json.loads((OUT / "agent.json").read_text()) if t not in ("PAD", "EPAD"))
        print(f"\nagent audio: {OUT / 'agent.wav'}\nagent text:  {OUT / 'agent.json'}\n  {text[:300]!r}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
