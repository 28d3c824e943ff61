"""`make demo`: `ppx-offline` on a recording and a role prompt that ship with the project.

With HF_TOKEN granting nvidia/personaplex-7b-v1 and a GPU, the real model runs. Otherwise a
tiny random model in the real checkpoint format is made on the spot and runs on the CPU; its
output is noise, and the demo says so.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "data" / "golden" / "tiny-1234"
OUT = ROOT / "artifacts" / "demo"


def _real_model_reason() -> str | None:
    """None when the real model can run here, else why not."""
    if not os.environ.get("HF_TOKEN"):
        return "HF_TOKEN is not set"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU (the 7B model needs one)"
    from engine.errors import UserError
    from engine.weights import DEFAULT_HF_REPO, resolve_file
    try:
        resolve_file(None, "config.json", DEFAULT_HF_REPO)
    except UserError as e:
        return str(e)
    return None


def main() -> int:
    from frontends.offline import main as offline

    OUT.mkdir(parents=True, exist_ok=True)
    prompt = json.loads((SAMPLES / "config.json").read_text())["text_prompt"]
    common = ["--input-wav", str(SAMPLES / "input.wav"), "--output-wav", str(OUT / "agent.wav"),
              "--output-text", str(OUT / "agent.json"), "--text-prompt", prompt, "--seed", "42"]
    reason = _real_model_reason()
    if reason is None:
        print("== PersonaPlex 7B (real weights from the hub), voice NATF2 ==", flush=True)
        args = common + ["--voice-prompt", "NATF2"]
    else:
        from engine.config import TINY
        from engine.random_weights import write_random_model

        print(f"== {reason}: running a TINY RANDOM model in the real checkpoint format ==\n"
              "   (its output is noise, not speech; with HF_TOKEN for nvidia/personaplex-7b-v1 and a GPU,\n"
              "    `make demo` runs the real model)", flush=True)
        paths = write_random_model(OUT / "tiny-random-model", TINY, seed=0, tokenizer=SAMPLES / "tokenizer.model")
        args = common + ["--voice-prompt", str(SAMPLES / "voice.wav"), "--moshi-weight", str(paths["lm"]),
                         "--mimi-weight", str(paths["mimi"]), "--tokenizer", str(paths["tokenizer"]),
                         "--config", str(paths["config"]), "--device", "cpu"]
    rc = offline(args)
    if rc == 0:
        text = "".join(t for t in json.loads((OUT / "agent.json").read_text()) if t not in ("PAD", "EPAD"))
        print(f"\nagent audio: {OUT / 'agent.wav'}\nagent text:  {OUT / 'agent.json'}\n  {text[:300]!r}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
