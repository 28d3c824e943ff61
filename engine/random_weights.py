"""Random checkpoints in the real file formats, for tests, demos and benchmarks.

Tensors follow the golden `ref7b-4242` recipe: for the i-th checkpoint key, x ~ N(0, 1) from
torch's CPU generator seeded with `seed * 1000 + i`; RMSNorm weights are 1 + 0.1 x, embedding
tables x, every other weight x / sqrt(fan_in); rounded to bf16.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import LMConfig, MimiConfig, ModelConfig
from .weights import LM_NAME_TABLE, _lm_ranges, expand_table, mimi_name_table

_EMB_PREFIXES = ("emb.", "text_emb.", "depformer_emb.", "depformer_text_emb.")


def lm_checkpoint_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference-format LM checkpoint for this config, in the reference's
    key order (the order of `keys.json`)."""
    t, d = cfg.temporal, cfg.depformer
    S = d.steps
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(cfg.n_q):
        shapes[f"emb.{k}.weight"] = (cfg.card + 1, t.dim)
    shapes["text_emb.weight"] = (cfg.text_card + 1, t.dim)
    shapes["text_linear.weight"] = (cfg.text_card, t.dim)
    for i in range(t.num_layers):
        p = f"transformer.layers.{i}"
        shapes[f"{p}.self_attn.in_proj_weight"] = (3 * t.dim, t.dim)
        shapes[f"{p}.self_attn.out_proj.weight"] = (t.dim, t.dim)
        shapes[f"{p}.norm1.alpha"] = (1, 1, t.dim)
        shapes[f"{p}.norm2.alpha"] = (1, 1, t.dim)
        shapes[f"{p}.gating.linear_in.weight"] = (2 * t.hidden, t.dim)
        shapes[f"{p}.gating.linear_out.weight"] = (t.dim, t.hidden)
    shapes["out_norm.alpha"] = (1, 1, t.dim)
    for k in range(S):
        shapes[f"depformer_in.{k}.weight"] = (d.dim, t.dim)
    for k in range(S - 1):
        shapes[f"depformer_emb.{k}.weight"] = (cfg.card + 1, d.dim)
    shapes["depformer_text_emb.weight"] = (cfg.text_card + 1, d.dim)
    for i in range(d.num_layers):
        p = f"depformer.layers.{i}"
        shapes[f"{p}.self_attn.in_proj_weight"] = (S * 3 * d.dim, d.dim)
        shapes[f"{p}.self_attn.out_proj.weight"] = (S * d.dim, d.dim)
        shapes[f"{p}.norm1.alpha"] = (1, 1, d.dim)
        shapes[f"{p}.norm2.alpha"] = (1, 1, d.dim)
        for k in range(S):
            shapes[f"{p}.gating.{k}.linear_in.weight"] = (2 * d.hidden, d.dim)
            shapes[f"{p}.gating.{k}.linear_out.weight"] = (d.dim, d.hidden)
    for k in range(S):
        shapes[f"linears.{k}.weight"] = (cfg.card, d.dim)
    assert set(shapes) == set(expand_table(LM_NAME_TABLE, _lm_ranges(cfg))), "shape list and name table disagree"
    return shapes


def random_tensor(name: str, shape, seed: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + index)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith(".alpha"):
        x = 1 + 0.1 * x
    elif not name.startswith(_EMB_PREFIXES):
        x = x / math.sqrt(shape[-1])
    return x.to(torch.bfloat16)


def random_lm_state_dict(cfg: LMConfig, seed: int, names: list[str] | None = None, threads: int = 1
                         ) -> dict[str, torch.Tensor]:
    """The random LM checkpoint as a dict (key order given by `names`, default the
    reference's). Each tensor has its own generator, so threads can share the work."""
    shapes = lm_checkpoint_shapes(cfg)
    names = names or list(shapes)
    jobs = [(n, shapes[n], i) for i, n in enumerate(names)]
    with ThreadPoolExecutor(max(1, threads)) as ex:
        tensors = list(ex.map(lambda j: random_tensor(j[0], j[1], seed, j[2]), jobs))
    return dict(zip(names, tensors))


def random_mimi_state_dict(cfg: MimiConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random Mimi checkpoint with the reference's keys (float32)."""
    from .mimi import Mimi

    g = torch.Generator().manual_seed(seed)
    m = Mimi(cfg, device="meta")
    params = dict(m.named_parameters())
    q = cfg.quantizer
    out: dict[str, torch.Tensor] = {}
    for key, tgt in mimi_name_table(cfg).items():
        if key.endswith("._initialized"):
            out[key] = torch.ones(1)
        elif key.endswith(".cluster_usage"):
            out[key] = torch.ones(q.bins)
        elif key.endswith(".embedding_sum"):
            out[key] = torch.randn(q.bins, q.dimension, generator=g)
        else:
            shape = tuple(params[tgt.param].shape)
            if tgt.kind == "conv1":
                shape = shape + (1,)
            if key.endswith(".bias"):
                out[key] = 0.01 * torch.randn(shape, generator=g)
            elif key.endswith(("norm1.weight", "norm2.weight")):
                out[key] = torch.ones(shape)
            elif key.endswith(("norm1.bias", "norm2.bias")):
                out[key] = torch.zeros(shape)
            elif key.endswith(".scale"):
                out[key] = torch.full(shape, 0.01)
            else:
                fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
                out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def write_random_model(directory: str | Path, cfg: ModelConfig, seed: int = 0, tokenizer: str | Path | None = None
                       ) -> dict[str, Path]:
    """Writes `model.safetensors`, the Mimi checkpoint and `config.json` (reference names);
    copies `tokenizer` beside them if given. Returns the paths."""
    from .weights import LM_FILE, MIMI_FILE, TOKENIZER_FILE

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"lm": d / LM_FILE, "mimi": d / MIMI_FILE, "config": d / "config.json"}
    save_file(random_lm_state_dict(cfg.lm, seed), str(paths["lm"]))
    save_file(random_mimi_state_dict(cfg.mimi, seed), str(paths["mimi"]))
    paths["config"].write_text(json.dumps(cfg.to_reference_json(), indent=1))
    if tokenizer is not None:
        paths["tokenizer"] = d / TOKENIZER_FILE
        paths["tokenizer"].write_bytes(Path(tokenizer).read_bytes())
    return paths


@torch.no_grad()
def randomize_lm_(lm: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fills an allocated `lm.LM` in place with the recipe's distributions, drawn on its own
    device (seconds for the 7B on a GPU, where writing and reading a checkpoint takes minutes)."""
    g = torch.Generator(device=next(lm.parameters()).device).manual_seed(seed)
    for name, p in lm.named_parameters():
        for row in (p.view(-1, p.shape[-1]).split(1 << 15) if p.dim() > 1 else [p.view(1, -1)]):
            x = torch.randn(row.shape, generator=g, device=row.device, dtype=torch.float32)
            if "norm" in name:
                x = 1 + 0.1 * x
            elif not name.endswith(("emb", "text_emb")):
                x = x / math.sqrt(p.shape[-1])
            row.copy_(x)
    return lm


def random_lm(cfg: LMConfig, device, dtype, seed: int = 0, quantize: str | None = None) -> torch.nn.Module:
    """An `lm.LM` of `cfg`'s shapes, drawn on its device (`randomize_lm_`), in e4m3 with quantize "fp8"."""
    from .lm import LM
    from .weights import materialize

    lm = randomize_lm_(materialize(lambda dtype: LM(cfg, dtype=dtype), device, dtype), seed)
    return lm.quantize_() if quantize == "fp8" else lm


def random_mimi(cfg: MimiConfig, device, seed: int = 0) -> torch.nn.Module:
    """A `mimi.Mimi` from `random_mimi_state_dict`, through the real loader."""
    import tempfile

    from .mimi import Mimi
    from .weights import load_mimi_weights, materialize

    mimi = materialize(lambda dtype: Mimi(cfg, dtype=dtype), device, torch.float32)
    with tempfile.TemporaryDirectory() as d:
        save_file(random_mimi_state_dict(cfg, seed), f"{d}/mimi.safetensors")
        load_mimi_weights(mimi, Path(f"{d}/mimi.safetensors"), cfg)
    return mimi


def random_voice(cfg: LMConfig, frames: int = 24, seed: int = 0):
    """A voice prompt in the `.pt` form with random embeddings (for benchmarks)."""
    from .prompts import VoicePrompt, plan_prompt

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (frames + 1, cfg.agent_codebooks), generator=g)
    plan = plan_prompt(cfg, VoicePrompt("codes", codes=codes), [], voice_only=True)
    emb = torch.randn(frames, cfg.temporal.dim, generator=g)
    return VoicePrompt(f"random-{seed}", embeddings=emb, cache=plan.tokens)
