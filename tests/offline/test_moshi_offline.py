"""The installed `ppx-offline` on Kyutai's Moshi checkpoints (tiny random ones in the hub's
layout, traced with Kyutai's `moshi` 0.2.13): `python -m moshi.run_inference`'s text exactly and
its audio within one PCM16 step, alone and in a batch; the prompts PersonaPlex takes are refused
in one sentence."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

from conftest import GOLDEN, TINY
from serving import installed


def moshi_args(name: str) -> list[str]:
    d = GOLDEN / name
    return ["--moshi-weight", str(d / "lm.safetensors"), "--mimi-weight", str(TINY / "mimi.safetensors"),
            "--tokenizer", str(TINY / "tokenizer.model"), "--config", str(d / "config.json"), "--device", "cpu",
            "--greedy", "--no-progress"]


def user_wav(name: str):
    d = GOLDEN / name
    return d / "input.wav" if (d / "input.wav").exists() else TINY / "input.wav"


def offline(tmp_path, *args):
    return subprocess.run([str(installed("ppx-offline")), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def same_as_reference(name: str, wav, text) -> None:
    ref = GOLDEN / name
    assert json.loads(text.read_text()) == json.loads((ref / "output.json").read_text())
    ours, sr = sf.read(wav, dtype="int16")
    theirs, _ = sf.read(ref / "output.wav", dtype="int16")
    assert sr == 24000 and ours.shape == theirs.shape
    assert np.abs(ours.astype(np.int32) - theirs).max() <= 1


@pytest.mark.parametrize("name", ["moshi-811", "moshi-4242"])
def test_offline_reproduces_run_inference(tmp_path, name):
    r = offline(tmp_path, "--input-wav", str(user_wav(name)), "--output-wav", "out.wav", "--output-text", "out.json",
                *moshi_args(name))
    assert r.returncode == 0, r.stderr[-3000:]
    same_as_reference(name, tmp_path / "out.wav", tmp_path / "out.json")


def test_a_batch_of_moshi_items_gives_each_its_own_answer(tmp_path):
    lines = [{"input": str(user_wav("moshi-811")), "output_wav": f"{i}.wav", "output_text": f"{i}.json"}
             for i in range(3)]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    r = offline(tmp_path, "--manifest", "items.jsonl", "--batch-size", "2", *moshi_args("moshi-811"))
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(3):
        same_as_reference("moshi-811", tmp_path / f"{i}.wav", tmp_path / f"{i}.json")


def test_prompts_are_refused_for_moshi_and_needed_for_personaplex(tmp_path):
    base = ["--input-wav", str(TINY / "input.wav"), "--output-wav", "o.wav", "--output-text", "o.json"]
    r = offline(tmp_path, *base, *moshi_args("moshi-811"), "--voice-prompt", "NATF2")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("error: --voice-prompt is PersonaPlex's: this Moshi checkpoint takes "
                                                 "no voice or role prompt (it starts every conversation from its "
                                                 "initial tokens)")
    r = offline(tmp_path, *base, *moshi_args("moshi-811"), "--text-prompt", "Be a pirate.", "--voice-prompt", "X")
    assert r.returncode == 1 and "--voice-prompt and --text-prompt are PersonaPlex's" in r.stderr
    r = offline(tmp_path, *base, "--moshi-weight", str(TINY / "lm.safetensors"), "--mimi-weight",
                str(TINY / "mimi.safetensors"), "--tokenizer", str(TINY / "tokenizer.model"), "--config",
                str(TINY / "config.json"), "--device", "cpu")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --voice-prompt is needed")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.wav").exists()
    help_text = offline(tmp_path, "--help").stdout
    assert "run_inference" in help_text and "stepped" in help_text
