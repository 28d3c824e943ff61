"""What the command-line tools share: model flags (named as the reference's), logging, and
turning user errors into one clear sentence and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, NoReturn

import torch

from engine.errors import UserError
from engine.weights import DEFAULT_HF_REPO

log = logging.getLogger("ppx")

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--moshi-weight", type=str, help="local LM checkpoint (model.safetensors)")
    g.add_argument("--mimi-weight", type=str, help="local Mimi checkpoint (tokenizer-e351c8d8-checkpoint125.safetensors)")
    g.add_argument("--tokenizer", type=str, help="local SentencePiece text tokenizer (tokenizer_spm_32k_3.model)")
    g.add_argument("--hf-repo", type=str, default=DEFAULT_HF_REPO,
                   help=f"hub repository for files not given locally (default {DEFAULT_HF_REPO}; needs HF_TOKEN)")
    g.add_argument("--config", type=str, help="model config JSON with the reference's names (default: the 7B)")
    g.add_argument("--device", type=str, default="auto", help="cuda, cpu, or auto (cuda when there is one)")
    g.add_argument("--dtype", type=str, default="auto", choices=["auto", *DTYPES],
                   help="LM weights and activations (auto: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--quantize", choices=["none", "fp8"], default="none",
                   help="fp8: e4m3 weights with a scale per output channel for the transformers' linears "
                        "(8.7 GB instead of 16.7 for the 7B; needs compute capability 8.9+)")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: the KV cache in e4m3 with a scale per vector (half the memory per session)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the tick eagerly instead of replaying CUDA graphs (the default follows PPX_CUDA_GRAPHS)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="accepted for compatibility with the reference; the engine keeps the model on one device")


def setup_logging(verbose: bool = False, tag: str | None = None) -> None:
    """One line per record; `tag` (such as "gpu 1") marks the lines of one of several processes."""
    where = f"[{tag}] " if tag else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s", datefmt="%H:%M:%S")


def die(msg: str, code: int = 1) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use cuda, cpu or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; pass --device cpu")
    return dev


def cache_dir() -> Path:
    """Where ppx keeps what it makes once: the demo model, encoded voices (`switches.CACHE`)."""
    from engine import switches

    return switches.CACHE


def model_config(args):
    """The model's config from --config (the reference's JSON names), or the 7B's: PersonaPlex's,
    or Moshi's when the checkpoint's depformer has 8 steps (finding it may fetch it from the hub)."""
    from engine.config import PERSONAPLEX_7B
    from engine.engine import resolve_config

    if getattr(args, "random_weights", False) and not args.config:
        return PERSONAPLEX_7B
    cfg = resolve_config(args.config, args.moshi_weight, args.hf_repo)
    if cfg.moshi:
        log.info("a Moshi checkpoint (%s): no voice or role prompt, conversations start from the model's initial "
                 "tokens", cfg.name)
    return cfg


def load_engine(args, cfg=None, max_slots: int | None = 1, most_slots: int | None = None):
    from engine.engine import Engine

    if getattr(args, "cpu_offload", False):
        log.warning("--cpu-offload is not needed: the engine keeps the whole model on the device")
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    return Engine.load(config=cfg if cfg is not None else args.config, moshi_weight=args.moshi_weight,
                       mimi_weight=args.mimi_weight,
                       tokenizer=args.tokenizer, hf_repo=args.hf_repo, device=device, dtype=dtype,
                       max_slots=max_slots, most_slots=most_slots, kv_window=getattr(args, "kv_window", None),
                       cuda_graphs=False if getattr(args, "no_cuda_graphs", False) else None,  # (None: the switch)
                       quantize=None if args.quantize == "none" else args.quantize,
                       kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
                       random_weights=getattr(args, "random_weights", False))


def run_main(fn: Callable[[], int]) -> int:
    """Runs a tool's body: user errors become one line on stderr and exit code 1."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory; try fewer sessions or a smaller --dtype", file=sys.stderr)
        return 1
