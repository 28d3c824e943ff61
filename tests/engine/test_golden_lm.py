"""The language model against the reference's golden trace, and prefill against stepping."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import SILENCE_TOKENS, SINE_TOKENS
from engine.sampling import SamplingParams
from engine.config import TEXT_PAD
from engine.tick import lm_tick, start_stream, user_mask, user_streams, write_given, write_streams

from engine.audio import first_channel, normalize_loudness, read_audio

from conftest import GREEDY, TINY, gpu, make_tiny_engine, user_frames


def _live(engine, slot, codes, return_logits=False):
    """Feeds the user's codes ([T, 8]) to one slot; returns tokens [T, 17] (and logits)."""
    cfg = engine.cfg.lm
    slots = torch.tensor([slot])
    mask = user_mask(cfg, 1, "cpu")
    engine.reserve_kv(slot, engine.lm_state.kv.window)   # (lm_tick takes no KV pages itself)
    toks, tl, al = [], [], []
    with torch.no_grad():
        for c in codes:
            given = torch.zeros(1, cfg.num_streams, dtype=torch.long)
            given[0, 9:] = torch.as_tensor(c)
            o = lm_tick(engine.lm, engine.lm_state, slots, given, mask, engine.depformer_steps, return_logits)
            toks.append(o.tokens[0].numpy())
            if return_logits:
                tl.append(o.text_logits[0].numpy())
                al.append(o.audio_logits[0].numpy())
    if return_logits:
        return np.stack(toks), np.stack(tl), np.stack(al)
    return np.stack(toks)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_lm_reproduces_golden_tokens_and_logits(tiny_engine, trace, golden_voice, golden_prompt):
    slot = tiny_engine.open(golden_voice, golden_prompt, GREEDY)
    toks, tl, al = _live(tiny_engine, slot, user_frames(trace, 230), return_logits=True)
    np.testing.assert_array_equal(toks[:, :9], trace["tokens"][:, :9])
    for i in range(32):
        assert _rel(tl[i], trace["text_logits"][i]) < 1e-4, i
        assert _rel(al[i], trace["audio_logits"][i]) < 1e-4, i


def test_prompt_tokens_match_reference(tiny_engine, trace, golden_prompt):
    assert tiny_engine.tokenizer.encode_prompt(golden_prompt) == trace["prompt_tokens"].tolist()


@pytest.mark.parametrize("short", [False, True], ids=["prompt-past-the-window", "prompt-within-the-window"])
def test_prefill_leaves_the_state_stepping_leaves(trace, golden_voice, golden_prompt, short):
    # a prompt longer than the KV window keeps only its last positions; one within it (no
    # voice, a few words, a 64-frame window) takes the prefill's path that writes the rings
    # from the rope kernel
    window = None
    if short:
        golden_voice, golden_prompt, window = None, "Be brief.", 64
    sampling = SamplingParams(seed=1234)  # sampled, not greedy: the seed must carry over too
    a = make_tiny_engine(window=window)
    slot = a.open(golden_voice, golden_prompt, sampling)

    # The same prompt stepped frame by frame through the tick, as the reference does it.
    b = make_tiny_engine(window=window)
    cfg = b.cfg.lm
    st = b.lm_state
    b.reserve_kv(0, st.kv.window)
    st.set_sampling(0, seed=1234, audio_seed=1234, temp_text=0.7, temp_audio=0.8, topk_text=25, topk_audio=250, greedy=False)
    slots = torch.tensor([0])
    full = torch.ones(1, cfg.num_streams, dtype=torch.bool)
    dummy = torch.tensor([[TEXT_PAD] + [cfg.audio_initial_id] * cfg.n_q])
    with torch.no_grad():
        for emb in golden_voice.embeddings if golden_voice is not None else []:
            if int(st.offset[0]) == 0:
                start_stream(st, slots, dummy, full)
            lm_tick(b.lm, st, slots, dummy, full, b.depformer_steps, input_embeddings=emb[None])
        if golden_voice is not None:
            st.tokens[0] = golden_voice.cache
        texts = [TEXT_PAD] * 6 + b.tokenizer.encode_prompt(golden_prompt) + [TEXT_PAD] * 6
        for text in texts:
            given = torch.tensor([[text, *SILENCE_TOKENS, *SINE_TOKENS]])
            if int(st.offset[0]) == 0:  # no voice: the first silence frame starts the stream, no step
                start_stream(st, slots, given, full)
                continue
            lm_tick(b.lm, st, slots, given, full, b.depformer_steps)

    sa, sb = a.lm_state, b.lm_state
    assert int(sa.offset[slot]) == int(sb.offset[0])
    assert torch.equal(sa.tokens[slot], sb.tokens[0])
    assert torch.equal(sa.provided[slot], sb.provided[0])
    P = int(sa.offset[slot]) - 1
    W = a.cfg.lm.temporal.window
    n = min(P, W)
    for ka, kb in zip(sa.kv.read_slot(slot, n)[:2], sb.kv.read_slot(0, n)[:2]):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
    codes = user_frames(trace, 20)
    np.testing.assert_array_equal(_live(a, slot, codes), _live(b, 0, codes))


def test_slots_in_one_batch_equal_solo_runs(trace, golden_voice, golden_prompt):
    """Different voices, role prompts and seeds side by side give what each gives alone."""
    eng0 = make_tiny_engine(max_slots=2)
    pcm = first_channel(read_audio(TINY / "input.wav", 24000))
    other_voice = eng0.encode_voice(normalize_loudness(pcm[24000 * 3: 24000 * 5], 24000).astype(np.float32), "other")
    setups = [
        (golden_voice, golden_prompt, SamplingParams(seed=7)),
        (other_voice, "You are a pirate. Speak only about ships.", SamplingParams(seed=99, temp_text=1.0, topk_audio=40)),
    ]
    n = 24
    frames = [pcm[i * 1920:(i + n) * 1920].reshape(n, 1920) for i in (0, 100)]

    def run(engine, which):
        slots = [engine.open(*setups[w]) for w in which]
        outs = {s: [] for s in slots}
        for t in range(n):
            res = engine.step({s: frames[w][t] for s, w in zip(slots, which)})
            for s in slots:
                outs[s].append((res[s].tokens, res[s].pcm))
        return [outs[s] for s in slots]

    solo = [run(make_tiny_engine(max_slots=2), [w])[0] for w in (0, 1)]
    together = run(eng0, [0, 1])
    for w in (0, 1):
        np.testing.assert_array_equal(np.stack([t for t, _ in together[w]]), np.stack([t for t, _ in solo[w]]))
        np.testing.assert_allclose(np.stack([p for _, p in together[w]]), np.stack([p for _, p in solo[w]]),
                                   atol=1e-5)
    # and the two sessions did differ from each other
    assert not np.array_equal(np.stack([t for t, _ in together[0]]), np.stack([t for t, _ in together[1]]))


def test_a_cached_prompt_restores_the_same_state(trace, golden_voice, golden_prompt):
    eng = make_tiny_engine(max_slots=3)
    a = eng.open(golden_voice, golden_prompt, GREEDY)
    assert eng.prompt_cache.misses == 1 and len(eng.prompt_cache) == 1
    b = eng.open(golden_voice, golden_prompt, GREEDY)
    assert eng.prompt_cache.hits == 1
    st = eng.lm_state
    W = st.kv.window
    for ra, rb in zip(st.kv.read_slot(a, W)[:2], st.kv.read_slot(b, W)[:2]):
        assert torch.equal(ra, rb)
    assert torch.equal(st.tokens[a], st.tokens[b]) and int(st.offset[a]) == int(st.offset[b])
    codes = user_frames(trace, 230)
    np.testing.assert_array_equal(_live(eng, b, codes)[:, :9], trace["tokens"][:, :9])


def test_prompts_opened_together_equal_prompts_opened_alone(trace, golden_voice, golden_prompt):
    """One batched prefill pass over prompts of different lengths leaves each slot's state."""
    eng = make_tiny_engine(max_slots=2)
    a, b = eng.open_many([(golden_voice, golden_prompt, GREEDY), (None, "Be brief.", GREEDY)])
    solo = make_tiny_engine(max_slots=2)
    s0 = solo.open(golden_voice, golden_prompt, GREEDY)
    s1 = solo.open(None, "Be brief.", GREEDY)
    codes = user_frames(trace, 30)
    np.testing.assert_array_equal(_live(eng, a, codes), _live(solo, s0, codes))
    np.testing.assert_array_equal(_live(eng, b, codes), _live(solo, s1, codes))


def test_an_e4m3_kv_cache_prefills_its_prompts_eagerly():
    eng = make_tiny_engine(window=250, kv_cache_dtype="fp8")
    assert eng.prefill_graphs_for((40, 64, 200)).sizes == []


@pytest.mark.parametrize("kv_cache_dtype", [None, "fp8"])
def test_a_prompt_padded_to_its_graph_bucket_leaves_the_state_of_its_own_length(trace, golden_voice, golden_prompt,
                                                                              kv_cache_dtype):
    """The prefill graphs run a prompt padded with zero rows to their bucket's length and write
    every row to the rings (here their same code runs eagerly): the prompt's entries, and what
    the session then does, equal an unpadded prefill's."""
    padded = make_tiny_engine(max_slots=3, window=250, kv_cache_dtype=kv_cache_dtype)
    padded.prefill_graphs = padded.prefill_graphs_for((40, 64, 200, 256, 300))
    if kv_cache_dtype:   # (the padded prefill itself, run eagerly: what a graph of it would replay)
        from engine.graphs import BucketGraphs
        padded.prefill_graphs = BucketGraphs(
            lambda x, slot: padded.lm.temporal_prefill(x, padded.lm_state.kv, slot, [x.shape[1]]),
            lambda T: (torch.zeros(1, T, padded.cfg.lm.temporal.dim), torch.full((1,), padded.lm_state.scratch)),
            (40, 64, 200))
    padded.prefill_graphs.capture(cuda=False)
    assert padded.prefill_graphs.sizes == [40, 64, 200]  # (none past the window)
    plain = make_tiny_engine(max_slots=3, window=250, kv_cache_dtype=kv_cache_dtype)
    codes = user_frames(trace, 20)
    for voice, text in [(None, "Be brief."), (None, "You are a pirate. Speak only about ships and the sea."),
                        (golden_voice, golden_prompt)]:
        a, b = padded.open(voice, text, GREEDY), plain.open(voice, text, GREEDY)
        n = int(padded.lm_state.offset[a]) - 1
        assert padded.prefill_graphs.bucket(n).size > n  # (29, 57, 194 positions: each padded)
        ka, va, sa = padded.lm_state.kv.read_slot(a, n)
        kb, vb, sb = plain.lm_state.kv.read_slot(b, n)
        for x, y in [(ka, kb), (va, vb)] + (list(zip(sa, sb)) if kv_cache_dtype else []):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(_live(padded, a, codes), _live(plain, b, codes))


def test_capturing_graphs_tells_each_bucket_as_it_starts():
    """A capture of many buckets takes minutes on a machine's first start: the engine logs each."""
    from engine.graphs import BucketGraphs

    g = BucketGraphs(lambda x: x + 1, lambda b: (torch.zeros(b),), (4, 1, 2))
    told = []
    g.capture(cuda=False, progress=lambda i, n, size, seconds: told.append((i, n, size, seconds >= 0)))
    assert told == [(0, 3, 4, True), (1, 3, 2, True), (2, 3, 1, True)]
    assert torch.equal(g.replay(g.bucket(2)), torch.ones(2))


def test_which_prompts_the_prefill_graphs_take():
    """Prompts that fit a bucket replay its graph, up to four opened together (one with e4m3
    weights, where one batched pass is faster); longer ones, or more, run the eager pass."""
    eng = make_tiny_engine(window=100)
    eng.prefill_graphs = pg = eng.prefill_graphs_for((40, 64, 128))
    assert pg.sizes == [40, 64] and pg.bucket(65) is None
    pg.capture(cuda=False)
    assert pg.bucket(30).size == 40 and pg.bucket(41).size == 64
    takes = eng._prefill_replays
    assert takes([30]) and takes([30, 64, 1, 2]) and not takes([30] * 5) and not takes([30, 65])
    eng8 = make_tiny_engine(window=100, quantize="fp8")
    eng8.prefill_graphs = eng8.prefill_graphs_for((40, 64))
    eng8.prefill_graphs.capture(cuda=False)
    assert eng8._prefill_replays([30]) and not eng8._prefill_replays([30, 30])


class _Touches(TorchDispatchMode):
    """Records the entries of the watched tensors that indexing reads and index_put writes
    (as (name, i, j, k)), whatever value a write puts there."""

    def __init__(self, **watched):
        super().__init__()
        self.names = {t.untyped_storage().data_ptr(): n for n, t in watched.items()}
        self.reads, self.writes = set(), set()

    def _entries(self, t, indices):
        name = self.names.get(t.untyped_storage().data_ptr())
        if name is None:
            return set()
        cols = torch.broadcast_tensors(*indices)
        return {(name, *map(int, e)) for e in zip(*(c.reshape(-1).tolist() for c in cols))}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                    torch.ops.aten._index_put_impl_.default):
            self.writes |= self._entries(args[0], args[1])
        elif func is torch.ops.aten.index.Tensor:
            self.reads |= self._entries(args[0], args[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("offset", [None, 1])
def test_the_encoders_writes_leave_the_steps_entries_alone(golden_voice, golden_prompt, offset):
    # On a GPU the engine's encoder writes the user's codes on its own stream while the LM step
    # runs (`Engine.tick`): the entries it writes must be ones the step neither reads nor
    # writes. (A write of every stream's column with the unmasked entries' old values raced
    # with the step's writes of the frame's text and first audio token.) offset 1: the first
    # steps of a stream, where the step also writes initial tokens.
    eng = make_tiny_engine()
    slot = eng.open(golden_voice, golden_prompt, GREEDY)
    st, cfg = eng.lm_state, eng.cfg.lm
    if offset is not None:
        st.offset[slot] = offset
    slots = torch.tensor([slot])
    off = st.offset[slots].clone()
    users = user_streams(cfg, "cpu")
    codes = torch.arange(100, 100 + len(users)).view(1, -1)
    with _Touches(tokens=st.tokens, provided=st.provided) as enc:
        write_streams(st, slots, users, codes, off)
    R = st.tokens.shape[2]
    expect = {(name, slot, int(u), int(off + cfg.delays[u]) % R) for u in users for name in ("tokens", "provided")}
    assert enc.writes == expect
    assert st.tokens[slot, users, (off + st.delays[users]) % R].tolist() == codes[0].tolist()
    with torch.no_grad(), _Touches(tokens=st.tokens, provided=st.provided) as step:
        lm_tick(eng.lm, st, slots, None, None, eng.depformer_steps)
    assert step.writes and step.reads
    assert not enc.writes & (step.reads | step.writes)
    # the general writer, given the same codes through a mask, is not fit for this
    given = torch.zeros(1, cfg.num_streams, dtype=torch.long)
    given[:, users] = codes
    with _Touches(tokens=st.tokens, provided=st.provided) as whole:
        write_given(st, slots, given, user_mask(cfg, 1, "cpu"), off)
    assert whole.writes & step.writes


def _one_row_configs():
    from engine.kernels.products.calibration import CONFIGS
    return [c for kind, c in CONFIGS if kind == "one_row"]


@pytest.mark.parametrize("config", [None] + [gpu(c) for c in _one_row_configs()])
def test_depformer_one_row_launches_equal_the_separate_ops(monkeypatch, config):
    # One slot's depformer step runs its token embedding, in-frame attention and final residual
    # add inside the products' launches (None: the Triton path under the interpreter on the CPU;
    # on a GPU, each block shape the calibration may pick): the logits equal those of the
    # separate ops (the torch references), for ids -1, negative and real.
    from engine.kernels import common
    from engine.kernels.products import calibration as cal

    dev = "cpu" if config is None else "cuda"
    eng = make_tiny_engine(device=dev)
    lm, steps = eng.lm, eng.depformer_steps
    dim = lm.cfg.depformer.dim
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(1, steps, dim, generator=g).to(dev)
    prev = torch.tensor([-1, 5, -3, 7, 2, 0, 1, 3], device=dev)
    kinds = []
    one_row = cal.one_row
    monkeypatch.setattr(cal, "one_row", lambda *a, **k: (kinds.append(int(a[4].kind) if len(a) > 4 and a[4] else 0),
                                                         one_row(*a, **k))[1])
    if config is not None:  # the one-row kernel in this configuration for every one-row product, fused or not
        monkeypatch.setattr(cal, "kernel_for", lambda rows, K, w, scale, like:
                            ("one_row", config) if rows == 1 and common.triton_enabled(like) else None)
        monkeypatch.setattr(cal, "_fused_choice", {})
        monkeypatch.setattr(cal, "_pick_fused", lambda *a: cal.CONFIGS.index(("one_row", config)))
    logits = {}
    for on in (False, True):
        monkeypatch.setitem(common._state, "on_cpu" if config is None else "triton", on)
        kv = lm.depformer_cache(1, steps, dev)
        with torch.no_grad():
            logits[on] = [lm.depformer_step(k, inp[:, k], prev[k:k + 1], kv).cpu() for k in range(steps)]
    assert {1, 2, 3, 4} <= set(kinds)  # norm (with the embedding), SiLU, add, attention
    for a, b in zip(logits[False], logits[True]):
        assert _rel(a.numpy(), b.numpy()) < 1e-5
