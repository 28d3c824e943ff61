"""Makes a Moshi trace with Kyutai's own `moshi` package (`pip install moshi==0.2.13`, not a
dependency of this project): a tiny Moshi LM with random weights in the hub checkpoints' layout
(bf16 values, run in float32), the tiny Mimi of `tiny-1234/`, and a user recording, then

  * the streaming path as Kyutai's server runs it (each 80 ms frame encoded, stepped once, and
    the answer decoded when there is one): `trace.npz` `tokens` [frames - 1, 9] and `pcm`;
  * the offline path as `python -m moshi.run_inference` runs it (the first frame's codes
    stepped twice): `trace.npz` `offline_tokens` [frames, 9], `output.wav` (written as that
    tool writes it, sphn's PCM16) and `output.json` (each frame's text piece; PAD and EPAD
    named as `ppx-offline` names them).

    python tests/data/golden/make_moshi_trace.py OUT_DIR --seed 4242 --context 7 --input input.wav

Greedy, float32 on the CPU, one thread.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny-1234"


def lm_kwargs(context: int, dim: int, layers: int) -> dict:
    return {
        "dim": dim, "text_card": 256, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
        "num_heads": 4, "num_layers": layers, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
        "context": context, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 32, "depformer_dim_feedforward": 132,
        "depformer_num_heads": 2, "depformer_num_layers": 2, "depformer_layer_scale": None,
        "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
        "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
        "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    }


def hub_layout(state: dict) -> dict:
    """The module's state in the hub checkpoints' layout and dtype: each attention's per-step
    projections (`in_projs.{k}`, `out_projs.{k}`) stacked into one `in_proj_weight` and one
    `out_proj.weight`, in bf16."""
    import re

    out, stacks = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight", key)
        if m:
            stacks.setdefault((m[1], m[2]), {})[int(m[3])] = value
        else:
            out[key] = value
    for (prefix, kind), parts in stacks.items():
        name = f"{prefix}.in_proj_weight" if kind == "in" else f"{prefix}.out_proj.weight"
        out[name] = torch.cat([parts[k] for k in sorted(parts)], dim=0)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def main() -> None:
    import sphn
    from moshi.models import LMGen, loaders
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--context", type=int, default=7)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--input", default=str(TINY / "input.wav"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    cfg = json.loads((TINY / "config.json").read_text())
    kwargs = lm_kwargs(args.context, args.dim, args.layers)
    # random weights, stored in bf16 as the hub's are, then loaded back as the reference runs them
    torch.manual_seed(args.seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("alpha"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.6 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.2))
    save_file(hub_layout(lm.state_dict()), str(out / "lm.safetensors"))
    lm = loaders.get_moshi_lm(out / "lm.safetensors", lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
    (out / "config.json").write_text(json.dumps({"lm": kwargs, "mimi": cfg["mimi"], "seed": args.seed,
                                                 "model": "moshi", "reference": "moshi==0.2.13"}, indent=1))
    mc = dict(cfg["mimi"])
    mc.pop("num_codebooks", None)
    mc["channels"] = 1

    pcm, _ = sphn.read(args.input, sample_rate=24000)
    x = torch.from_numpy(pcm[None, 0:1])
    chunks = [c for c in x.split(1920, dim=2) if c.shape[-1] == 1920]
    if Path(args.input).resolve() != (TINY / "input.wav").resolve():
        shutil.copy(args.input, out / "input.wav")

    def run(offline: bool):
        mimi = loaders.get_mimi(TINY / "mimi.safetensors", mc, device="cpu", num_codebooks=8)
        gen = LMGen(lm, use_sampling=False)
        toks, pcms = [], []
        first = True
        with mimi.streaming(1), gen.streaming(1):
            for c in chunks:
                codes = mimi.encode(c)
                if offline and first:
                    assert gen.step(codes) is None
                first = False
                t = gen.step(codes)
                if t is None:
                    continue
                toks.append(t[0, :, 0].numpy())
                pcms.append(mimi.decode(t[:, 1:])[0, 0].numpy())
        return np.array(toks), np.array(pcms)

    tokens, stream_pcm = run(offline=False)
    offline_tokens, offline_pcm = run(offline=True)
    np.savez_compressed(out / "trace.npz", tokens=tokens, pcm=stream_pcm, offline_tokens=offline_tokens)
    sphn.write_wav(str(out / "output.wav"), offline_pcm.reshape(-1), sample_rate=24000)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    names = {0: "EPAD", 3: "PAD"}
    size = sp.get_piece_size()
    text = [names.get(int(i), sp.id_to_piece(int(i)).replace("\u2581", " ") if 0 <= int(i) < size else "<unk>")
            for i in offline_tokens[:, 0]]
    (out / "output.json").write_text(json.dumps(text, ensure_ascii=False))
    distinct = len(set(offline_tokens[:, 0].tolist()))
    print(f"{out}: {len(chunks)} frames, {tokens.shape[0]} streamed, {distinct} distinct text tokens")


if __name__ == "__main__":
    main()
