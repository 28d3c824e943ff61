"""The fast path on a GPU: graphs and Triton kernels against the golden traces and against the
eager torch path. Skipped without a CUDA GPU."""
import json
import math

import numpy as np
import pytest
import torch

from engine.config import PERSONAPLEX_7B
from engine.sampling import SamplingParams
from engine.prompts import load_voice_pt
from engine.kernels import use_triton
from engine.engine import Engine
from engine.random_weights import random_voice
from engine.tick import lm_tick, teacher_force, user_mask

from conftest import GOLDEN, GREEDY, TINY, forget_kernel_choices, make_tiny_engine

pytestmark = pytest.mark.gpu
TOKENIZER = TINY / "tokenizer.model"


@pytest.fixture()
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("slow_encoder", [False, True])
def test_golden_run_through_the_graphs_in_float32(no_tf32, trace, golden_voice, golden_prompt, slow_encoder):
    """The whole tick (Mimi on the GPU too) replayed from CUDA graphs gives the golden tokens.
    slow_encoder: the encoder, on its own stream beside the LM step, ends well after the step
    (a ~1 ms GPU sleep), so its writes of the user's codes land after the step's writes of
    the frame's tokens, which they must leave alone."""
    from engine.audio import first_channel, frames, read_audio

    eng = make_tiny_engine(max_slots=2, device="cuda", dtype=torch.float32)
    if slow_encoder:
        encode = eng.mimi.encode

        def slow(*a, **k):
            codes = encode(*a, **k)
            torch.cuda._sleep(2_000_000)
            return codes

        eng.mimi.encode = slow
    eng.enable_graphs()
    assert eng.graphs is not None
    slot = eng.open(golden_voice, golden_prompt, GREEDY)
    pcm = frames(first_channel(read_audio(TINY / "input.wav", 24000)), 1920)
    toks, audio = [], []
    for f in pcm:
        out = eng.step({slot: f})[slot]
        toks.append(out.tokens)
        audio.append(out.pcm)
    toks = np.stack(toks)
    np.testing.assert_array_equal(toks[:, :9], trace["tokens"][:, :9])
    np.testing.assert_array_equal(toks[1:, 9:], trace["tokens"][1:, 9:])
    np.testing.assert_allclose(np.stack(audio), trace["pcm"], atol=1e-4)


@pytest.mark.parametrize("kv_cache_dtype", [None])   # (e4m3 KV: prompts prefill eagerly, `Engine.prefill_graphs_for`)
def test_the_prefill_graphs_leave_what_the_eager_prefill_leaves(no_tf32, golden_voice, golden_prompt, kv_cache_dtype):
    """float32, TF32 off, a KV window that the prompts fit: prompts prefilled by their bucket's
    CUDA graph leave the rings the eager prefill leaves, and the sessions then give the same
    tokens."""
    from engine.audio import first_channel, frames, read_audio

    graphed = make_tiny_engine(max_slots=2, device="cuda", window=250, kv_cache_dtype=kv_cache_dtype)
    eager = make_tiny_engine(max_slots=2, device="cuda", window=250, kv_cache_dtype=kv_cache_dtype,
                             cuda_graphs=False)
    pg = graphed.prefill_graphs
    assert pg is not None and pg.sizes[-1] <= 249 and eager.prefill_graphs is None
    replays = []
    replay = graphed._prefill_replay
    graphed._prefill_replay = lambda slot, rows: (replays.append(rows.shape[0]), replay(slot, rows))
    pcm = frames(first_channel(read_audio(TINY / "input.wav", 24000)), 1920)[:20]
    for voice, text in [(golden_voice, golden_prompt), (None, "Be brief.")]:
        a, b = graphed.open(voice, text, GREEDY), eager.open(voice, text, GREEDY)
        n = int(graphed.lm_state.offset[a]) - 1
        assert replays[-1] == n and pg.bucket(n).size > n
        ka, va, sa = graphed.lm_state.kv.read_slot(a, n)
        kb, vb, sb = eager.lm_state.kv.read_slot(b, n)
        for x, y in [(ka, kb), (va, vb)] + (list(zip(sa, sb)) if kv_cache_dtype else []):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-5)
        ta = np.stack([graphed.step({a: f})[a].tokens for f in pcm])
        tb = np.stack([eager.step({b: f})[b].tokens for f in pcm])
        np.testing.assert_array_equal(ta, tb)
        graphed.close(a)
        eager.close(b)


def test_a_collection_during_a_capture_frees_nothing_there():
    """A CUDA graph dropped in a reference cycle is freed by the next garbage collection. One
    that ran inside another capture used to fail that capture (an engine dropped by one test
    failed the next test's capture); `capturing` collects first and holds collections off."""
    import gc

    from engine.device import capturing

    x = torch.zeros(4, device="cuda")

    def drop_a_graph_in_a_cycle():
        g = torch.cuda.CUDAGraph()
        with capturing(g):
            x.add_(1)
        cycle = [g]
        cycle.append(cycle)

    thresholds = gc.get_threshold()
    try:
        for collect in (False, True):
            drop_a_graph_in_a_cycle()
            g = torch.cuda.CUDAGraph()
            with capturing(g, collect=collect):
                gc.set_threshold(1)  # (from here on a collection at nearly every allocation, if enabled)
                ys = [x * i for i in range(64)]
            gc.set_threshold(*thresholds)
            assert gc.isenabled()
    finally:
        gc.set_threshold(*thresholds)
    g.replay()
    assert all(torch.equal(y, x * i) for i, y in enumerate(ys))


def _ref7b_run(dtype, n_frames):
    from engine.random_weights import random_lm_state_dict
    from engine.lm import LM
    from engine.weights import LM_NAME_TABLE, _lm_ranges, expand_table, materialize
    from engine.state import LMState
    from engine.prompts import plan_prompt

    d = GOLDEN / "ref7b-4242"
    keys = json.loads((d / "keys.json").read_text())
    cfg = PERSONAPLEX_7B.lm
    lm = materialize(lambda dtype: LM(cfg, dtype=dtype), "cuda", dtype)
    params = dict(lm.named_parameters())
    plan_keys = expand_table(LM_NAME_TABLE, _lm_ranges(cfg))
    names = [k[0] for k in keys]
    sd = random_lm_state_dict(cfg, 4242, names=names, threads=16)
    for name, shape, s, ss in keys:
        t = sd.pop(name)
        t64 = t.double()
        assert math.isclose(float(t64.sum()), s, rel_tol=1e-9, abs_tol=1e-6), name
        assert math.isclose(float((t64 * t64).sum()), ss, rel_tol=1e-9), name
        tgt = plan_keys[name]
        dst = params[tgt.param]
        t = t.to("cuda")
        if tgt.kind == "alpha":
            t = t.view(-1)
        elif tgt.kind == "step":
            dst = dst[tgt.index]
        elif tgt.kind == "steps":
            t = t.view(dst.shape)
        dst.copy_(t)
    inputs = np.load(d / "inputs.npz")
    voice = load_voice_pt(d / "voice.pt")
    plan = plan_prompt(cfg, voice, inputs["prompt_tokens"].tolist())
    state = LMState(cfg, 1, "cuda", dtype)
    with torch.no_grad():
        x = torch.cat([voice.embeddings.cuda().to(dtype), lm.embed(plan.columns.cuda())])[None]
        lm.temporal_prefill(x, state.kv, torch.tensor([0], device="cuda"), [x.shape[1]])
        state.load_ring(0, plan.tokens, plan.provided, plan.offset)
        state.set_sampling(0, seed=0, temp_text=0.7, temp_audio=0.8, topk_text=25, topk_audio=250, greedy=True)
        toks, tls, als = [], [], []
        slots = torch.tensor([0], device="cuda")
        for t in range(n_frames):
            given = torch.zeros(1, 17, dtype=torch.long, device="cuda")
            given[0, 9:] = torch.from_numpy(inputs["user_tokens"][t]).cuda()
            o = lm_tick(lm, state, slots, given, user_mask(cfg, 1, "cuda"), 8, return_logits=True)
            toks.append(o.tokens[0].cpu().numpy())
            tls.append(o.text_logits[0].cpu())
            als.append(o.audio_logits[0].cpu())
    del lm, state
    torch.cuda.empty_cache()
    return np.stack(toks), torch.stack(tls), torch.stack(als)


def test_ref7b_float32_matches_the_reference_exactly(no_tf32):
    """The 7B shapes, regenerated from keys.json, in float32 on the GPU: the reference's tokens."""
    tr = np.load(GOLDEN / "ref7b-4242" / "trace_fp32.npz")
    toks, tl, al = _ref7b_run(torch.float32, 100)
    np.testing.assert_array_equal(toks[:, :9], tr["tokens"][:, :9])
    for i in range(8):
        assert _rel(tl[i], torch.from_numpy(tr["text_logits"][i])) < 1e-4
        assert _rel(al[i], torch.from_numpy(tr["audio_logits"][i])) < 1e-4


def test_ref7b_bfloat16_lands_near_the_reference(no_tf32):
    """bf16 is expected at about the reference's own bf16 distance from its float32 logits."""
    tr32 = np.load(GOLDEN / "ref7b-4242" / "trace_fp32.npz")
    rob = json.loads((GOLDEN / "ref7b-4242" / "robustness.json").read_text())
    _, tl, _ = _ref7b_run(torch.bfloat16, 4)
    err = _rel(tl[0], torch.from_numpy(tr32["text_logits"][0]))
    assert err < 3 * rob["bf16_vs_fp32_text_logit_rel_err_frame0"], err


def _seven_b(max_slots, **kw):
    return Engine.load(config=PERSONAPLEX_7B, tokenizer=TOKENIZER, random_weights=True, cuda_graphs=False,
                       device="cuda", dtype=torch.bfloat16, seed=1, max_slots=max_slots, **kw)


@pytest.fixture(scope="module")
def seven_b_pair():
    """Two engines over the same random 7B weights: one eager on the torch references, one
    on the graphs with the Triton kernels."""
    a = _seven_b(4)
    b = type(a)(a.cfg, a.lm, a.mimi, a.tokenizer, max_slots=4, checkpoint_id=a.checkpoint_id)
    b.enable_graphs(buckets=(1, 4), logits=True)
    return a, b


def _force_target(dst, dslot, src, sslot, offset):
    teacher_force(dst.lm_state, dslot, src.lm_state, sslot, offset)


def _lockstep(engines, graphed, slots, sb, n, triton_flags):
    """Per frame: the graphed engine's whole tick, then each eager engine's LM (Triton kernels
    or the torch references), teacher-forced to the same tokens (user codes included). Each
    engine keeps its own KV rings, so numerical drift accumulates over the frames. Returns,
    per eager engine, the per-frame max of the (text, audio) logit relative errors."""
    cfg = graphed.cfg.lm
    g = torch.Generator().manual_seed(0)
    no_given = torch.zeros(1, cfg.num_streams, dtype=torch.long, device="cuda")
    no_mask = torch.zeros(1, cfg.num_streams, dtype=torch.bool, device="cuda")
    errs = [[] for _ in engines]
    for eng, s in [(graphed, sb)] + list(zip(engines, slots)):
        eng.reserve_kv(s, eng.lm_state.kv.window)   # (step_tensors and lm_tick take no KV pages)
    for _ in range(n):
        pcm = (0.1 * torch.randn(1, 1920, generator=g)).cuda()
        o = int(graphed.lm_state.offset[sb])
        _, _, tl_g, al_g = graphed.step_tensors(torch.tensor([sb], device="cuda"), pcm, logits=True)
        for j, (eng, s, tri) in enumerate(zip(engines, slots, triton_flags)):
            _force_target(eng, s, graphed, sb, o)
            use_triton(tri)
            try:
                out = lm_tick(eng.lm, eng.lm_state, torch.tensor([s], device="cuda"), no_given, no_mask,
                              eng.depformer_steps, return_logits=True)
            finally:
                use_triton(True)
            errs[j].append(max(_rel(tl_g[0], out.text_logits[0]), _rel(al_g[0], out.audio_logits[0])))
    return errs


def test_7b_graph_path_stays_within_2e2_of_the_eager_path(seven_b_pair):
    """Teacher-forced for 100 frames at the 7B shapes (random bf16 weights): the CUDA-graph
    path against the same code run eagerly (graphs off), and against the torch references."""
    a, b = seven_b_pair
    c = type(a)(a.cfg, a.lm, a.mimi, a.tokenizer, max_slots=1, checkpoint_id=a.checkpoint_id)
    voice = random_voice(a.cfg.lm, seed=3)
    prompt = "You are a helpful assistant for a bicycle shop. Answer briefly and kindly."
    sb = b.open(voice, prompt, SamplingParams(seed=5))
    slots = [c.open(voice, prompt, SamplingParams(seed=5)), a.open(voice, prompt, SamplingParams(seed=5))]
    same_code, torch_ref = _lockstep([c, a], b, slots, sb, 100, [True, False])
    q = lambda e: (float(np.median(e)), float(np.percentile(e, 99)), max(e))  # noqa: E731
    print("graph vs eager (same kernels): median %.1e p99 %.1e max %.1e" % q(same_code))
    print("graph vs torch references:     median %.1e p99 %.1e max %.1e" % q(torch_ref))
    assert max(same_code) < 2e-2
    # two bf16 implementations, each ~1.4e-2 from float32 (the reference's own bf16 distance):
    # about sqrt(2) x 1.4e-2 apart, constant from the first frame
    assert max(torch_ref) < 3e-2
    b.close(sb)
    a.close(slots[1])


def test_7b_batch_rows_equal_single_slot_runs(seven_b_pair):
    """Three sessions batched vs each run alone (bucket 1), teacher-forced to the same tokens
    every frame (each keeping its own KV rings): no row leaks into another. A slot alone runs
    the one-row kernels (norm and SiLU fused into the product), a batch the small-batch ones,
    so the two are two bf16 implementations: ~sqrt(2) x 1.4e-2 apart, as in the test above."""
    _, b = seven_b_pair
    solo = type(b)(b.cfg, b.lm, b.mimi, b.tokenizer, max_slots=3, checkpoint_id=b.checkpoint_id)
    solo.enable_graphs(buckets=(1,), logits=True)
    prompts = ["You are a pirate.", "You answer questions about trains.", "You are a calm yoga teacher."]
    voices = [random_voice(b.cfg.lm, seed=s) for s in range(3)]
    reqs = [(v, p, SamplingParams(seed=i)) for i, (v, p) in enumerate(zip(voices, prompts))]
    slots = b.open_many(reqs)
    solo_slots = solo.open_many(reqs)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for t in range(30):
        pcm = (0.1 * torch.randn(3, 1920, generator=g)).cuda()
        offs = [int(b.lm_state.offset[s]) for s in slots]
        _, _, tl_b, al_b = b.step_tensors(torch.tensor(slots, device="cuda"), pcm, logits=True)
        for i, s in enumerate(solo_slots):
            _force_target(solo, s, b, slots[i], offs[i])
            _, _, tl_s, al_s = solo.step_tensors(torch.tensor([s], device="cuda"), pcm[i:i + 1], logits=True)
            worst = max(worst, _rel(tl_s[0], tl_b[i]), _rel(al_s[0], al_b[i]))
    print(f"batched vs single-slot over 30 frames: worst logit error {worst:.2e}")
    assert worst < 3e-2, worst
    for s in slots:
        b.close(s)


def test_a_restart_takes_the_kernel_choices_kept_on_disk(monkeypatch, tmp_path):
    """The first product of a shape is timed and its choice written to PPX_KERNEL_CACHE; a
    process starting afresh on the same GPU reads it back instead of timing it again."""
    from engine import switches
    from engine.kernels.products import linear
    from engine.kernels.products import choice_cache

    monkeypatch.setattr(switches, "KERNEL_CACHE", tmp_path)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16)
    cal = forget_kernel_choices(monkeypatch)
    y = linear(x, w)
    assert cal.calibration_stats()["products"] == 1 and (tmp_path / choice_cache.FILE).exists()
    chosen = dict(cal._choice)
    cal = forget_kernel_choices(monkeypatch)
    torch.testing.assert_close(linear(x, w), y)
    assert cal.calibration_stats()["products"] == 0 and cal.calibration_stats()["from_cache"] == 1
    assert cal._choice == chosen
