"""How far FP8 weights and the FP8 KV cache move the model: each variant runs beside the
unquantized engine, teacher-forced to its tokens every frame (its own KV rings accumulate its
own error), and its text and audio logits are compared: top-1 agreement and KL divergence
(softmax at temperature 1, KL(unquantized || variant)).

    python -m benchmarks.fidelity --golden            # the golden tiny model, float32, CPU
    python -m benchmarks.fidelity --frames 200        # the 7B shapes, random bf16 weights, GPU
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "golden" / "tiny-1234"


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(p_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def compare(leader, variants: dict, slots: dict, frames: int, pcm_source) -> dict:
    """leader: an Engine (its whole tick); variants: name -> Engine sharing the config. Each
    variant's LM is stepped teacher-forced to the leader's tokens."""
    from engine.tick import lm_tick, teacher_force

    cfg = leader.cfg.lm
    dev = leader.device
    no_given = torch.zeros(1, cfg.num_streams, dtype=torch.long, device=dev)
    no_mask = torch.zeros(1, cfg.num_streams, dtype=torch.bool, device=dev)
    stats = {name: {"text_top1": [], "audio_top1": [], "text_kl": [], "audio_kl": []} for name in variants}
    ls = slots["leader"]
    for eng, s in [(leader, ls)] + [(e, slots[n]) for n, e in variants.items()]:
        eng.reserve_kv(s, eng.lm_state.kv.window)   # (step_tensors and lm_tick take no KV pages)
    for t in range(frames):
        pcm = pcm_source(t).to(dev)
        o = int(leader.lm_state.offset[ls])
        _, _, tl, al = leader.step_tensors(torch.tensor([ls], device=dev), pcm, logits=True)
        for name, eng in variants.items():
            s = slots[name]
            teacher_force(eng.lm_state, s, leader.lm_state, ls, o)
            with torch.no_grad():
                out = lm_tick(eng.lm, eng.lm_state, torch.tensor([s], device=dev), no_given, no_mask,
                              eng.depformer_steps, return_logits=True)
            st = stats[name]
            st["text_top1"].append(float(out.text_logits[0].argmax() == tl[0].argmax()))
            st["audio_top1"].append((out.audio_logits[0].argmax(-1) == al[0].argmax(-1)).float().mean().item())
            st["text_kl"].append(_kl(tl[0], out.text_logits[0]).item())
            st["audio_kl"].append(_kl(al[0], out.audio_logits[0]).mean().item())
    return {name: {k: float(np.mean(v)) for k, v in st.items()} for name, st in stats.items()}


def golden(frames: int = 230) -> dict:
    """On the golden tiny model (float32, CPU): the teacher-forced comparison, and the free
    running (greedy) agreement of each variant's tokens with the reference's."""
    import json as _json

    from engine.audio import first_channel, frames as to_frames, read_audio
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from engine.prompts import load_voice_pt

    files = dict(config=TINY / "config.json", moshi_weight=TINY / "lm.safetensors",
                 mimi_weight=TINY / "mimi.safetensors", tokenizer=TINY / "tokenizer.model")
    mk = lambda **kw: Engine.load(**files, device="cpu", dtype=torch.float32, **kw)  # noqa: E731
    voice = load_voice_pt(TINY / "voice.pt")
    prompt = _json.loads((TINY / "config.json").read_text())["text_prompt"]
    greedy = SamplingParams(greedy=True, seed=0)
    pcm = torch.from_numpy(to_frames(first_channel(read_audio(TINY / "input.wav", 24000)), 1920))
    trace = np.load(TINY / "trace.npz")
    kinds = {"fp8 weights": dict(quantize="fp8"), "fp8 KV cache": dict(kv_cache_dtype="fp8"),
             "fp8 weights + KV": dict(quantize="fp8", kv_cache_dtype="fp8")}
    leader = mk()
    variants = {n: mk(**kw) for n, kw in kinds.items()}
    slots = {"leader": leader.open(voice, prompt, greedy)}
    slots.update({n: e.open(voice, prompt, greedy) for n, e in variants.items()})
    out = compare(leader, variants, slots, frames, lambda t: pcm[t:t + 1])
    for n, kw in kinds.items():  # free running, greedy: tokens against the reference's
        e = mk(**kw)
        s = e.open(voice, prompt, greedy)
        toks = np.stack([e.step({s: pcm[t].numpy()})[s].tokens for t in range(frames)])
        same = (toks[:, :9] == trace["tokens"][:frames, :9])
        first = int(np.argmin(same.all(1))) if not same.all() else frames
        out[n].update(token_agreement=float(same.mean()), frames_before_first_difference=first)
    return out


def seven_b(frames: int) -> dict:
    from engine.config import PERSONAPLEX_7B
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from engine.random_weights import random_voice

    tok = TINY / "tokenizer.model"
    leader = Engine.load(config=PERSONAPLEX_7B, tokenizer=tok, random_weights=True, cuda_graphs=False,
                         device="cuda", dtype=torch.bfloat16, seed=5, max_slots=1)
    leader.enable_graphs(buckets=(1,), logits=True)
    fp8 = Engine.load(config=PERSONAPLEX_7B, tokenizer=tok, random_weights=True, cuda_graphs=False,
                      device="cuda", dtype=torch.bfloat16, seed=5, max_slots=1)
    fp8.lm.quantize_()
    mk = lambda lm, kv: Engine(leader.cfg, lm, leader.mimi, leader.tokenizer, max_slots=1,  # noqa: E731
                               checkpoint_id=f"{lm is leader.lm}-{kv}", kv_cache_dtype=kv)
    variants = {"fp8 weights": mk(fp8.lm, None), "fp8 KV cache": mk(leader.lm, "fp8"),
                "fp8 weights + KV": mk(fp8.lm, "fp8")}
    voice = random_voice(leader.cfg.lm, seed=2)
    prompt = "You are a helpful assistant for a bicycle shop."
    sp = SamplingParams(seed=3)
    slots = {"leader": leader.open(voice, prompt, sp)}
    slots.update({n: e.open(voice, prompt, sp) for n, e in variants.items()})
    g = torch.Generator().manual_seed(0)
    pcm = [0.1 * torch.randn(1, 1920, generator=g) for _ in range(frames)]
    return compare(leader, variants, slots, frames, lambda t: pcm[t])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", action="store_true", help="the golden tiny model on the CPU")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--json", type=str)
    args = ap.parse_args(argv)
    res = golden(min(args.frames, 230)) if args.golden else seven_b(args.frames)
    for name, r in res.items():
        print(f"{name:18s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
