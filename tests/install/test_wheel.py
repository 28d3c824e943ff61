"""The product as a user installs it: the wheel `pip wheel .` builds, installed into a fresh
virtual environment outside the source tree, runs `ppx-offline` on the golden trace from another
directory and gives the reference's output; its three commands answer `--help`.

(About 45 s on a 2-core machine, most of it pip unpacking torch into the new environment.)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A fresh venv with the built wheel installed (torch pinned to this one's version, so pip
    takes the same build rather than fetching another)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = tmp / "src"
    # built from a copy of the tracked and new files, as a clean clone has them (no .venv, no build/)
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "artifacts",
                                                                 "__pycache__", ".pytest_cache", "tests"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
          build], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("ppx-*.whl")
    shutil.rmtree(build)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], cwd=tmp)
    _run([py, "-m", "pip", "install", "-q", wheel], cwd=tmp)
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def test_the_wheel_holds_the_packages_and_the_page(wheel_venv, tmp_path):
    py = wheel_venv / "bin" / "python"
    r = _run([py, "-c", "import engine, engine.kernels, engine.graphs, frontends, voices, frontends.demo as d;"
                        "import importlib.resources as ir;"
                        "print(engine.__file__);"
                        "print(ir.files('frontends').joinpath('static/index.html').is_file(), d.ASSETS.is_dir())"],
             cwd=tmp_path)
    where, found = r.stdout.split("\n")[:2]
    assert where.startswith(str(wheel_venv)), where  # the installed copy, not the source tree
    assert found == "True True"
    for cmd in ("ppx-offline", "ppx-serve", "ppx-voice"):
        _run([wheel_venv / "bin" / cmd, "--help"], cwd=tmp_path)


def test_the_installed_wheel_reproduces_the_reference(wheel_venv, tmp_path):
    data = tmp_path / "golden"
    shutil.copytree(TINY, data)
    prompt = json.loads((data / "config.json").read_text())["text_prompt"]
    _run([wheel_venv / "bin" / "ppx-offline", "--input-wav", "golden/input.wav", "--output-wav", "out.wav",
          "--output-text", "out.json", "--voice-prompt", "golden/voice.pt", "--text-prompt", prompt,
          "--moshi-weight", "golden/lm.safetensors", "--mimi-weight", "golden/mimi.safetensors",
          "--tokenizer", "golden/tokenizer.model", "--config", "golden/config.json", "--device", "cpu",
          "--greedy", "--no-progress"], cwd=tmp_path)
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads((data / "output.json").read_text())
    ours, rate = sf.read(tmp_path / "out.wav", dtype="int16")
    ref, _ = sf.read(data / "output.wav", dtype="int16")
    assert rate == 24000 and ours.shape == ref.shape
    assert np.abs(ours.astype(np.int32) - ref).max() <= 1  # within one PCM16 step
