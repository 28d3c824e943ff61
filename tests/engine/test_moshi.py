"""Kyutai's Moshi checkpoints in the engine: traces of Kyutai's own `moshi` package (0.2.13) on
tiny random Moshi models in the hub's layout (`moshi-811`, and `moshi-4242`, made with
tests/data/golden/make_moshi_trace.py: another seed, size, context and input). The streaming
path (each frame stepped once, nothing for the first) gives its tokens exactly and its audio
within one PCM16 step; the offline path (`prime`, then a step per frame) its tokens exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from engine.config import MOSHI_7B, PERSONAPLEX_7B, ConfigError, load_config
from engine.engine import Engine, resolve_config
from engine.errors import UserError
from engine.prompts import VoicePrompt
from engine.sampling import SamplingParams

from conftest import GOLDEN, TINY

TRACES = ["moshi-811", "moshi-4242"]
STEP = 1 / 32768  # one PCM16 step


def moshi_engine(name: str, slots: int = 1) -> Engine:
    d = GOLDEN / name
    return Engine.load(config=d / "config.json", moshi_weight=d / "lm.safetensors",
                       mimi_weight=TINY / "mimi.safetensors", tokenizer=TINY / "tokenizer.model", device="cpu",
                       max_slots=slots)


def user_frames(name: str) -> list[np.ndarray]:
    d = GOLDEN / name
    wav = d / "input.wav" if (d / "input.wav").exists() else TINY / "input.wav"
    pcm, _ = sf.read(wav, dtype="float32")
    return [pcm[i * 1920:(i + 1) * 1920] for i in range(len(pcm) // 1920)]


GREEDY = SamplingParams(greedy=True)


@pytest.mark.parametrize("name", TRACES)
def test_streaming_gives_kyutai_server_tokens_and_audio(name):
    z = np.load(GOLDEN / name / "trace.npz")
    eng = moshi_engine(name)
    assert eng.cfg.moshi
    slot = eng.open(None, None, GREEDY)
    outs = [eng.step({slot: f})[slot] for f in user_frames(name)]
    assert not outs[0].valid and not outs[0].pcm.any()  # the acoustic delay: nothing for the first frame
    assert all(o.valid for o in outs[1:])
    tokens = np.array([o.tokens[:9] for o in outs[1:]])
    np.testing.assert_array_equal(tokens, z["tokens"])
    assert np.abs(np.array([o.pcm for o in outs[1:]]) - z["pcm"]).max() <= STEP


@pytest.mark.parametrize("name", TRACES)
def test_offline_gives_run_inference_tokens(name):
    z = np.load(GOLDEN / name / "trace.npz")
    eng = moshi_engine(name)
    slot = eng.open(None, None, GREEDY)
    eng.prime(slot)
    tokens = np.array([eng.step({slot: f})[slot].tokens[:9] for f in user_frames(name)])
    np.testing.assert_array_equal(tokens, z["offline_tokens"])
    with pytest.raises(ValueError):
        eng.prime(slot)


def test_slots_share_ticks_and_a_slot_is_reused():
    """A session joining another's ticks (its first frame beside the other's hundredth), and a
    slot freed and opened again, give what each gives alone."""
    z = np.load(GOLDEN / "moshi-811" / "trace.npz")
    frames = user_frames("moshi-811")
    eng = moshi_engine("moshi-811", slots=2)
    a = eng.open(None, None, GREEDY)
    got = {a: [], "b": []}
    for t in range(100):
        got[a].append(eng.step({a: frames[t]})[a])
    b = eng.open(None, None, GREEDY)
    for t in range(100, len(frames)):
        out = eng.step({a: frames[t], b: frames[t - 100]})
        got[a].append(out[a])
        got["b"].append(out[b])
    np.testing.assert_array_equal(np.array([o.tokens[:9] for o in got[a][1:]]), z["tokens"])
    np.testing.assert_array_equal(np.array([o.tokens[:9] for o in got["b"][1:]]), z["tokens"][:len(frames) - 101])
    eng.close(a)
    again = eng.open(None, None, GREEDY)
    assert again == a
    toks = [eng.step({again: f})[again] for f in frames[:40]]
    np.testing.assert_array_equal(np.array([o.tokens[:9] for o in toks[1:]]), z["tokens"][:39])


def test_a_moshi_slot_takes_no_prompt():
    eng = moshi_engine("moshi-811")
    with pytest.raises(UserError, match="no voice prompt"):
        eng.open(VoicePrompt("x", codes=np.zeros((4, 8), dtype=np.int64)), None, GREEDY)
    with pytest.raises(UserError, match="no role prompt"):
        eng.open(None, "You are a pirate.", GREEDY)
    assert eng.open(None, "", GREEDY) == 0  # (an empty role prompt is none)


def test_moshi_is_recognised_from_the_checkpoint_or_the_config(tmp_path):
    # no config: the checkpoint's depformer tells (8 steps: Moshi's 7B; 16: PersonaPlex's)
    assert resolve_config(None, GOLDEN / "moshi-811" / "lm.safetensors") is MOSHI_7B
    assert resolve_config(None, TINY / "lm.safetensors") is PERSONAPLEX_7B
    assert MOSHI_7B.lm.depformer.steps == 8 and MOSHI_7B.lm.temporal.window == 3000
    assert PERSONAPLEX_7B.lm.temporal.window == 2999
    d = json.loads((GOLDEN / "moshi-811" / "config.json").read_text())
    for model, family in ((None, "moshi"), ("personaplex", "personaplex"), ("moshi", "moshi")):
        d.pop("model", None)
        if model:
            d["model"] = model
        (tmp_path / "c.json").write_text(json.dumps(d))
        assert load_config(tmp_path / "c.json").family == family
    d["model"] = "gpt"
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="'model' = 'gpt'"):
        load_config(tmp_path / "c.json")
    # a Moshi checkpoint under a config of other shapes: the file and the tensor are named
    with pytest.raises(UserError, match=r"lm\.safetensors.*(tensor|missing)"):
        Engine.load(moshi_weight=GOLDEN / "moshi-4242" / "lm.safetensors", mimi_weight=TINY / "mimi.safetensors",
                    tokenizer=TINY / "tokenizer.model", config=GOLDEN / "moshi-811" / "config.json", device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", TRACES)
def test_moshi_through_the_graphs_in_float32(name):
    """On a GPU, the CUDA-graph tick (encoder before the step, as Moshi reads its input) in
    float32 with TF32 off gives the streaming trace's tokens; two slots share ticks."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        d = GOLDEN / name
        z = np.load(d / "trace.npz")
        eng = Engine.load(config=d / "config.json", moshi_weight=d / "lm.safetensors",
                          mimi_weight=TINY / "mimi.safetensors", tokenizer=TINY / "tokenizer.model", device="cuda",
                          dtype=torch.float32, max_slots=2)
        assert eng.graphs is not None
        frames = user_frames(name)
        a, b = eng.open(None, None, GREEDY), eng.open(None, None, GREEDY)
        outs = [eng.step({a: f, b: f}) for f in frames]
        for slot in (a, b):
            np.testing.assert_array_equal(np.array([o[slot].tokens[:9] for o in outs[1:]]), z["tokens"])
            assert np.abs(np.array([o[slot].pcm for o in outs[1:]]) - z["pcm"]).max() < 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
