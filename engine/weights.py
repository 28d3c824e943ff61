"""Checkpoints: where they are, and how their tensors map onto the engine's parameters.

Every checkpoint key the engine knows is in one declarative table; loading is strict (an
unknown, missing or misshapen key is an error that names it), converts dtype on the way, and
copies tensor by tensor into parameters allocated once on the target device, so a checkpoint
never exists twice in memory.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from .config import LMConfig, MimiConfig
from .errors import UserError

log = logging.getLogger("ppx.weights")

DEFAULT_HF_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_FILE = "voices.tgz"


class WeightsError(UserError, RuntimeError):
    """A checkpoint that cannot be found or loaded; the message says what to do."""


# ----------------------------------------------------------------------------------------
# Finding files


def resolve_file(local: str | os.PathLike | None, filename: str, hf_repo: str = DEFAULT_HF_REPO) -> Path:
    """A local path if given (it must exist), else `filename` from the hub repo (cached;
    `hub.hub_file` fails fast, with what to do, when the hub cannot give it)."""
    if local is not None:
        p = Path(local).expanduser()
        if not p.is_file():
            raise WeightsError(f"'{p}' does not exist or is not a file")
        return p
    from .hub import hub_file
    return hub_file(hf_repo, filename)


def file_id(path: Path) -> str:
    """A checkpoint's identity for caches keyed by it: its real path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# ----------------------------------------------------------------------------------------
# The name table


@dataclass(frozen=True)
class Entry:
    """Checkpoint key pattern -> parameter. `{i}` runs over layers (`layers`), `{k}` over
    `steps`; kind says how the stored tensor becomes the parameter:
      same   - as stored
      alpha  - an RMSNorm weight stored as [1, 1, d]
      step   - row k of a parameter stacked per step/codebook
      steps  - per-step weights stored stacked as [steps * out, in]
      conv1  - a 1x1 convolution [out, in, 1] used as a matrix
      drop   - a buffer the engine does not use (training state, unused codebooks)
    """
    key: str
    param: str
    kind: str = "same"
    layers: str | None = None
    steps: str | None = None


LM_NAME_TABLE: tuple[Entry, ...] = (
    Entry("emb.{k}.weight", "emb", "step", steps="n_q"),
    Entry("text_emb.weight", "text_emb"),
    Entry("transformer.layers.{i}.norm1.alpha", "layers.{i}.norm1", "alpha", layers="temporal"),
    Entry("transformer.layers.{i}.self_attn.in_proj_weight", "layers.{i}.attn_in.weight", layers="temporal"),
    Entry("transformer.layers.{i}.self_attn.out_proj.weight", "layers.{i}.attn_out.weight", layers="temporal"),
    Entry("transformer.layers.{i}.norm2.alpha", "layers.{i}.norm2", "alpha", layers="temporal"),
    Entry("transformer.layers.{i}.gating.linear_in.weight", "layers.{i}.ffn_in.weight", layers="temporal"),
    Entry("transformer.layers.{i}.gating.linear_out.weight", "layers.{i}.ffn_out.weight", layers="temporal"),
    Entry("out_norm.alpha", "out_norm", "alpha"),
    Entry("text_linear.weight", "text_head.weight"),
    Entry("depformer_in.{k}.weight", "depformer.inp.weight", "step", steps="dep"),
    Entry("depformer_text_emb.weight", "depformer.text_emb"),
    Entry("depformer_emb.{k}.weight", "depformer.emb", "step", steps="dep_emb"),
    Entry("depformer.layers.{i}.norm1.alpha", "depformer.layers.{i}.norm1", "alpha", layers="depformer"),
    Entry("depformer.layers.{i}.self_attn.in_proj_weight", "depformer.layers.{i}.attn_in.weight", "steps",
          layers="depformer"),
    Entry("depformer.layers.{i}.self_attn.out_proj.weight", "depformer.layers.{i}.attn_out.weight", "steps",
          layers="depformer"),
    Entry("depformer.layers.{i}.norm2.alpha", "depformer.layers.{i}.norm2", "alpha", layers="depformer"),
    Entry("depformer.layers.{i}.gating.{k}.linear_in.weight", "depformer.layers.{i}.ffn_in.weight", "step",
          layers="depformer", steps="dep"),
    Entry("depformer.layers.{i}.gating.{k}.linear_out.weight", "depformer.layers.{i}.ffn_out.weight", "step",
          layers="depformer", steps="dep"),
    Entry("linears.{k}.weight", "depformer.heads.weight", "step", steps="dep"),
)

# Per-step groups that an 8-step depformer checkpoint lacks for steps 8..15 (copied from k - 8).
_EXTENDABLE = re.compile(r"^(depformer\.layers\.\d+\.gating|linears|depformer_in|depformer_emb)\.(\d+)\.")


def _lm_ranges(cfg: LMConfig) -> dict[str, int]:
    return {
        "temporal": cfg.temporal.num_layers, "depformer": cfg.depformer.num_layers,
        "n_q": cfg.n_q, "dep": cfg.depformer.steps, "dep_emb": cfg.depformer.steps - 1,
    }


@dataclass(frozen=True)
class Target:
    param: str
    kind: str
    index: int | None
    sources: tuple[str, ...] = ()


def expand_table(table: Iterable[Entry], ranges: dict[str, int]) -> dict[str, Target]:
    """Checkpoint key -> where it goes, for every key a checkpoint of this config holds."""
    out: dict[str, Target] = {}
    for e in table:
        for i in range(ranges[e.layers]) if e.layers else [None]:
            for k in range(ranges[e.steps]) if e.steps else [None]:
                key = e.key.format(i=i, k=k)
                out[key] = Target(e.param.format(i=i, k=k), e.kind, k if e.kind == "step" else None)
    return out


# ----------------------------------------------------------------------------------------
# Loading


class _Checkpoint:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:
            raise WeightsError(f"'{path}' is not a readable safetensors checkpoint ({e})") from None
        self.keys = set(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


def _assign(dst: torch.Tensor, src: torch.Tensor, key: str, kind: str, path: Path,
            scale: torch.Tensor | None = None) -> None:
    """Copies src into dst (converting dtype); into an e4m3 dst, quantizes per row and fills
    `scale`, on dst's device."""
    if tuple(src.shape) != tuple(dst.shape):
        raise WeightsError(f"'{path}': tensor '{key}' has shape {tuple(src.shape)}, this model expects "
                           f"{tuple(dst.shape)} ({kind}): the checkpoint is of another model size or architecture")
    with torch.no_grad():
        if scale is not None:
            from .quant import quantize_rows
            w8, s = quantize_rows(src.to(dst.device))
            dst.copy_(w8)
            scale.copy_(s)
        else:
            dst.copy_(src)


def depformer_steps(path: Path) -> int:
    """The depformer steps an LM checkpoint holds weights for (its `linears.{k}` heads): 16 in
    PersonaPlex's, 8 in Kyutai's Moshi's."""
    keys = _Checkpoint(path).keys
    return sum(1 for k in keys if re.fullmatch(r"linears\.\d+\.weight", k))


def load_lm_weights(model: torch.nn.Module, path: Path, cfg: LMConfig) -> None:
    """Fills `model` (an `lm.LM`, parameters allocated) from a reference-format checkpoint."""
    ck = _Checkpoint(path)
    plan = expand_table(LM_NAME_TABLE, _lm_ranges(cfg))
    extra = sorted(ck.keys - plan.keys())
    if extra:
        raise WeightsError(f"'{path}': unexpected tensor '{extra[0]}'"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    steps = cfg.depformer.steps
    half = steps // 2
    sources: dict[str, str] = {}
    extended = False
    for key in sorted(plan.keys() - ck.keys):
        m = _EXTENDABLE.match(key)
        src = None
        if m and int(m.group(2)) >= half and steps == 16:
            src = key.replace(f"{m.group(1)}.{m.group(2)}.", f"{m.group(1)}.{int(m.group(2)) - half}.", 1)
        if src is None or src not in ck.keys:
            raise WeightsError(f"'{path}': missing tensor '{key}'")
        sources[key] = src
        extended = True
    params = _params(model)
    for key, tgt in plan.items():
        dst = params[tgt.param]
        # an e4m3 weight has a scale beside it (`engine.quant`)
        scale = params.get(tgt.param[: -len("weight")] + "scale") if tgt.param.endswith(".weight") else None
        src_key = sources.get(key, key)
        t = ck.get(src_key)
        if tgt.kind == "alpha":
            t = t.reshape(-1) if t.dim() == 3 and t.shape[:2] == (1, 1) else t
        elif tgt.kind == "step":
            dst = dst[tgt.index]
            scale = scale[tgt.index] if scale is not None else None
        elif tgt.kind == "steps":
            per = dst[0].numel() // dst.shape[-1]
            if t.dim() == 2 and t.shape[0] * 2 == steps * per and t.shape[1] == dst.shape[-1] and steps == 16:
                t = torch.cat([t, t], dim=0)  # an 8-step depformer, extended as the reference does
                extended = True
            if t.dim() != 2 or t.shape[0] != steps * per:
                raise WeightsError(f"'{path}': tensor '{key}' has shape {tuple(t.shape)}, this model expects "
                                   f"({steps * per}, {dst.shape[-1]})")
            t = t.view(dst.shape)
        _assign(dst, t, key, tgt.kind, path, scale)
    if extended:
        log.info("extended an 8-step depformer checkpoint to %d steps, as the reference does", steps)


# ----------------------------------------------------------------------------------------
# Mimi


def mimi_name_table(cfg: MimiConfig) -> dict[str, Target]:
    """Checkpoint key -> parameter for Mimi, generated from the SEANet layout."""
    s = cfg.seanet
    out: dict[str, Target] = {}

    def conv(ck_prefix: str, param: str, wrapper: str):
        for p in ("weight", "bias"):
            out[f"{ck_prefix}.{wrapper}.{wrapper}.{p}"] = Target(f"{param}.{p}", "same", None)

    def resblock(ck_prefix: str, param: str):
        conv(f"{ck_prefix}.block.1", f"{param}.conv1", "conv")
        conv(f"{ck_prefix}.block.3", f"{param}.conv2", "conv")

    # encoder: conv, [res, elu, down] * len(ratios), elu, conv
    idx = 0
    conv(f"encoder.model.{idx}", "encoder.convs.0", "conv")
    idx += 1
    for n in range(len(s.ratios)):
        for j in range(s.n_residual_layers):
            resblock(f"encoder.model.{idx}", f"encoder.res.{n}.{j}")
            idx += 1
        idx += 1  # ELU
        conv(f"encoder.model.{idx}", f"encoder.convs.{n + 1}", "conv")
        idx += 1
    idx += 1
    conv(f"encoder.model.{idx}", f"encoder.convs.{len(s.ratios) + 1}", "conv")
    # decoder: conv, [elu, up, res] * len(ratios), elu, conv
    idx = 0
    conv(f"decoder.model.{idx}", "decoder.conv_in", "conv")
    idx += 1
    for n in range(len(s.ratios)):
        idx += 1  # ELU
        conv(f"decoder.model.{idx}", f"decoder.ups.{n}", "convtr")
        idx += 1
        for j in range(s.n_residual_layers):
            resblock(f"decoder.model.{idx}", f"decoder.res.{n}.{j}")
            idx += 1
    idx += 1
    conv(f"decoder.model.{idx}", "decoder.conv_out", "conv")
    for side in ("encoder", "decoder"):
        for i in range(cfg.transformer.num_layers):
            ck = f"{side}_transformer.transformer.layers.{i}"
            p = f"{side}_transformer.layers.{i}"
            for a, b in (("norm1.weight", "norm1.weight"), ("norm1.bias", "norm1.bias"),
                         ("norm2.weight", "norm2.weight"), ("norm2.bias", "norm2.bias"),
                         ("self_attn.in_proj_weight", "attn_in"), ("self_attn.out_proj.weight", "attn_out"),
                         ("linear1.weight", "linear1"), ("linear2.weight", "linear2"),
                         ("layer_scale_1.scale", "scale1"), ("layer_scale_2.scale", "scale2")):
                out[f"{ck}.{a}"] = Target(f"{p}.{b}", "same", None)
    out["downsample.conv.conv.conv.weight"] = Target("downsample", "same", None)
    out["upsample.convtr.convtr.convtr.weight"] = Target("upsample", "same", None)
    q = cfg.quantizer
    used_rest = cfg.num_codebooks - q.n_q_semantic
    for name, n, used in (("rvq_first", q.n_q_semantic, q.n_q_semantic), ("rvq_rest", q.n_q - q.n_q_semantic,
                                                                        used_rest)):
        short = "first" if name == "rvq_first" else "rest"
        out[f"quantizer.{name}.input_proj.weight"] = Target(f"quantizer.{short}_in", "conv1", None)
        out[f"quantizer.{name}.output_proj.weight"] = Target(f"quantizer.{short}_out", "conv1", None)
        for c in range(n):
            base = f"quantizer.{name}.vq.layers.{c}._codebook"
            out[f"{base}._initialized"] = Target("", "drop", None)
            if c < used:
                out[f"{base}.embedding_sum"] = Target(f"quantizer.{short}_codebooks", "codebook", c,
                                                      (f"{base}.embedding_sum", f"{base}.cluster_usage"))
                out[f"{base}.cluster_usage"] = Target("", "drop", None)
            else:
                out[f"{base}.embedding_sum"] = Target("", "drop", None)
                out[f"{base}.cluster_usage"] = Target("", "drop", None)
    return out


def load_mimi_weights(model: torch.nn.Module, path: Path, cfg: MimiConfig) -> None:
    ck = _Checkpoint(path)
    plan = mimi_name_table(cfg)
    params = _params(model)
    # Biases the engine's modules lack (none today) would show up as unknown params here.
    plan = {k: t for k, t in plan.items() if t.kind == "drop" or t.param in params}
    extra = sorted(ck.keys - plan.keys())
    if extra:
        raise WeightsError(f"'{path}': unexpected tensor '{extra[0]}'"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(plan.keys() - ck.keys)
    if missing:
        raise WeightsError(f"'{path}': missing tensor '{missing[0]}'")
    filled = set()
    for key, tgt in plan.items():
        if tgt.kind == "drop":
            continue
        dst = params[tgt.param]
        t = ck.get(key)
        if tgt.kind == "conv1":
            t = t.squeeze(-1) if t.dim() == 3 and t.shape[-1] == 1 else t
        elif tgt.kind == "codebook":
            usage = ck.get(tgt.sources[1])
            # The reference's EuclideanCodebook.embedding, with its epsilon 1e-5.
            t = t / usage.clamp(min=1e-5)[:, None]
            dst = dst[tgt.index]
        _assign(dst, t, key, tgt.kind, path)
        filled.add(tgt.param)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise WeightsError(f"'{path}' holds nothing for parameter '{unfilled[0]}'")


def materialize(module_factory: Callable[..., torch.nn.Module], device, dtype) -> torch.nn.Module:
    """Builds a module on the meta device, then allocates its parameters once on `device`
    (each in its own dtype: e4m3 weights stay e4m3)."""
    with torch.device("meta"):
        m = module_factory(dtype=dtype)
    m = m.to_empty(device=device)
    return m.eval()
