"""FP8 weights and KV cache: quantization, loading, the engine's paths (CPU references and the
kernels under the interpreter), and how close the golden tiny model stays."""
import numpy as np
import pytest
import torch

from engine.config import PERSONAPLEX_7B
from engine.lm import LM
from engine.quant import FP8, check_fp8_device, dequantize_rows, quantize_rows

from conftest import GREEDY, TINY, make_tiny_engine, tiny_files, user_frames


def test_quantized_rows_stay_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g)
    w8, s = quantize_rows(w)
    assert w8.dtype == FP8 and s.shape == (64,)
    err = (dequantize_rows(w8, s) - w).abs() / w.abs().amax(-1, keepdim=True)
    assert err.max() < 2 ** -4 * 1.01  # half an e4m3 step at the top binade, relative to the row max


def test_the_7b_in_fp8_weighs_under_10_gb():
    lm = LM(PERSONAPLEX_7B.lm, device="meta", dtype=torch.bfloat16, quant="fp8")
    gb = sum(p.numel() * p.element_size() for p in lm.parameters()) / 1e9
    assert 8 < gb < 10
    assert lm.emb.dtype == torch.bfloat16 and lm.layers[0].ffn_in.weight.dtype == FP8


def test_a_checkpoint_quantizes_as_it_loads():
    from engine.engine import Engine

    eng = Engine.load(**tiny_files(), device="cpu", dtype=torch.float32, quantize="fp8")
    ref = make_tiny_engine()
    w = ref.lm.depformer.layers[1].ffn_in.weight[9]
    q = eng.lm.depformer.layers[1].ffn_in
    torch.testing.assert_close(dequantize_rows(q.weight[9], q.scale[9]), w, rtol=0.07, atol=1e-3)


def test_fp8_stays_close_to_the_unquantized_model_teacher_forced(golden_voice, golden_prompt):
    from benchmarks.fidelity import compare
    from engine.audio import first_channel, frames, read_audio
    from engine.engine import Engine

    pcm = torch.from_numpy(frames(first_channel(read_audio(TINY / "input.wav", 24000)), 1920))
    leader = make_tiny_engine()
    variants = {"w": Engine.load(**tiny_files(), device="cpu", dtype=torch.float32, quantize="fp8"),
                "kv": Engine.load(**tiny_files(), device="cpu", dtype=torch.float32, kv_cache_dtype="fp8")}
    slots = {"leader": leader.open(golden_voice, golden_prompt, GREEDY)}
    slots.update({n: e.open(golden_voice, golden_prompt, GREEDY) for n, e in variants.items()})
    res = compare(leader, variants, slots, 60, lambda t: pcm[t:t + 1])
    assert res["w"]["text_top1"] >= 0.9 and res["w"]["audio_top1"] >= 0.9
    assert res["kv"]["text_top1"] >= 0.98 and res["kv"]["audio_top1"] >= 0.98
    assert res["w"]["text_kl"] < 1e-3 and res["kv"]["text_kl"] < 1e-5


def test_an_fp8_kv_prompt_restores_from_the_cache(golden_voice, golden_prompt, trace):
    from engine.engine import Engine
    from test_golden_lm import _live

    eng = Engine.load(**tiny_files(), device="cpu", dtype=torch.float32, kv_cache_dtype="fp8", max_slots=2)
    a = eng.open(golden_voice, golden_prompt, GREEDY)
    b = eng.open(golden_voice, golden_prompt, GREEDY)
    assert eng.prompt_cache.hits == 1
    kv = eng.lm_state.kv
    n = int(eng.lm_state.offset[a]) - 1
    assert kv.k.dtype == FP8 and torch.equal(kv.read_slot(a, n)[2][0], kv.read_slot(b, n)[2][0])
    codes = user_frames(trace, 20)
    np.testing.assert_array_equal(_live(eng, a, codes), _live(eng, b, codes))


def test_offline_runs_with_both_options(tmp_path):
    from frontends.offline import main

    args = ["--input-wav", str(TINY / "input.wav"), "--output-wav", str(tmp_path / "o.wav"), "--output-text",
            str(tmp_path / "o.json"), "--voice-prompt", str(TINY / "voice.pt"), "--greedy", "--no-progress",
            "--device", "cpu", "--quantize", "fp8", "--kv-cache-dtype", "fp8",
            *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in tiny_files().items()), [])]
    assert main(args) == 0
    assert (tmp_path / "o.wav").stat().st_size > 800_000


def test_gpus_without_fp8_get_a_clear_error(monkeypatch):
    from engine.errors import UserError

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(UserError, match="compute capability 8.9"):
        check_fp8_device(torch.device("cuda"))
