"""Shared fixtures: the golden traces of the reference (tests/data/golden) and engines on them."""
from __future__ import annotations

import os

import torch

# Kernel choices are timed afresh in every test run, never read from or kept on disk.
os.environ["PPX_KERNEL_CACHE"] = "0"

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.prompts import load_voice_pt

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
TINY = GOLDEN / "tiny-1234"

torch.set_num_threads(2)


def tiny_files():
    return dict(config=TINY / "config.json", moshi_weight=TINY / "lm.safetensors",
                mimi_weight=TINY / "mimi.safetensors", tokenizer=TINY / "tokenizer.model")


def make_tiny_engine(max_slots: int = 1, device: str = "cpu", dtype=torch.float32, window: int | None = None,
                     **load_kw) -> Engine:
    """The golden tiny model; `window` replaces its temporal KV window (19 frames: context - 1)."""
    files = tiny_files()
    if window is not None:
        import dataclasses

        cfg = load_config(files["config"])
        files["config"] = dataclasses.replace(cfg, lm=dataclasses.replace(
            cfg.lm, temporal=dataclasses.replace(cfg.lm.temporal, context=window + 1)))
    # KV pages of 4 positions: the window spans several, the last one part-filled
    load_kw.setdefault("kv_page_size", 4)
    return Engine.load(**files, device=device, dtype=dtype, max_slots=max_slots, **load_kw)


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config(TINY / "config.json")


@pytest.fixture(scope="session")
def trace():
    return dict(np.load(TINY / "trace.npz"))


@pytest.fixture(scope="session")
def golden_prompt() -> str:
    return json.loads((TINY / "config.json").read_text())["text_prompt"]


@pytest.fixture(scope="session")
def golden_voice():
    return load_voice_pt(TINY / "voice.pt")


@pytest.fixture()
def tiny_engine():
    return make_tiny_engine(max_slots=4)


GREEDY = SamplingParams(greedy=True, seed=0)


def user_frames(trace, n: int, start: int = 0) -> np.ndarray:
    """The user's codes as the model heard them: frame i is output frame i + 1's streams 9..16.
    The last frame's codes never reach the output, so it repeats the one before."""
    toks = trace["tokens"]
    idx = np.minimum(np.arange(start, start + n) + 1, toks.shape[0] - 1)
    return toks[idx, 9:17]


CUDA = torch.cuda.is_available()
# Where a test's small and odd shapes run: the GPU when there is one, else the CPU (the Triton
# kernels through the interpreter). Shapes and dtypes only a GPU runs (the 7B's) carry the gpu mark.
DEVICE = "cuda" if CUDA else "cpu"


def gpu(*values):
    """A parametrize case that needs a CUDA GPU (the `gpu` mark: skipped without one)."""
    return pytest.param(*values, marks=pytest.mark.gpu)


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def forget_kernel_choices(monkeypatch):
    """The product calibration's state as a new process starts with it (restored after the test)."""
    from engine.kernels.products import calibration as cal

    monkeypatch.setattr(cal, "_choice", {})
    monkeypatch.setattr(cal, "_fused_choice", {})
    monkeypatch.setattr(cal, "_disk", {"path": None, "context": None, "read": False})
    monkeypatch.setattr(cal, "_calibrated", {"products": 0, "fused": 0, "seconds": 0.0, "from_cache": 0})
    return cal
