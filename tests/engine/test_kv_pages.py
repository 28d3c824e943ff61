"""The KV cache held by use: pages taken as a session's history grows, freed on close and
reused; admission refused when the pool is short; a live session the pool cannot serve keeps
stepping over the history it holds."""
import numpy as np
import pytest
import torch

from engine.engine import EngineFull
from engine.state import PagedKV

from conftest import GREEDY, make_tiny_engine


def test_pages_are_taken_as_history_grows_and_given_back():
    kv = PagedKV(layers=2, slots=3, heads=2, window=19, head_dim=8, device="cpu", dtype=torch.float32, pages=9,
                 page_size=4)
    assert (kv.page_size, kv.pages_per_slot, kv.free_pages) == (4, 5, 9)
    assert kv.reserve(0, 1) and kv.held(0) == 1
    assert kv.reserve(0, 4) and kv.held(0) == 1    # (positions 0..3: still the first page)
    assert kv.reserve(0, 9) and kv.held(0) == 3
    assert kv.reserve(0, 1000) and kv.held(0) == 5  # at most the window's pages
    assert not kv.reserve(1, 19)                     # 4 free, 5 needed: nothing taken
    assert kv.held(1) == 0 and kv.free_pages == 4
    kv.flush()
    mine = kv.table[0].tolist()
    assert sorted(mine) == [1, 2, 3, 4, 5] and kv.table[1].tolist() == [0] * 5   # (0: the scratch page)
    kv.release(0)
    kv.flush()
    assert kv.free_pages == 9 and kv.table[0].tolist() == [0] * 5
    assert kv.reserve(1, 19)
    kv.flush()
    assert set(kv.table[1].tolist()) <= set(range(1, 10))


def test_a_slot_out_of_pages_wraps_over_what_it_holds():
    kv = PagedKV(layers=1, slots=2, heads=1, window=19, head_dim=8, device="cpu", dtype=torch.float32, pages=2,
                 page_size=4)
    assert kv.reserve(0, 8) and not kv.reserve(0, 9)
    assert kv.shrink(0) == 8 and int(kv.window_of[0]) == 8
    kv.release(0)
    assert int(kv.window_of[0]) == 19


PROMPT = "Be brief."   # (29 positions: 8 pages of 4 with its first step)


def _run(eng, slot, codes):
    return np.stack([eng.step({slot: c})[slot].tokens for c in codes])


def test_admission_follows_the_free_pages_and_live_sessions_never_fail():
    # window 64 in pages of 4: a session fills 16; the pool holds 20
    eng = make_tiny_engine(max_slots=3, window=64, kv_pages=20)
    frames = [np.zeros(1920, np.float32)] * 40
    a = eng.open(None, PROMPT, GREEDY)
    took = eng.kv_stats()["used"]
    assert took == eng.lm_state.kv.held(a) == 8
    b = eng.open(None, PROMPT, GREEDY)
    assert eng.kv_stats()["free"] == 4
    # a third needs 8 and the two live ones keep one each in reserve: refused, with the reason
    with pytest.raises(EngineFull, match="KV cache is full"):
        eng.open(None, PROMPT, GREEDY)
    assert eng.kv_stats()["free"] == 4 and len(eng.slots) == 2   # the refusal took nothing
    for f in frames:   # both grow past what the pool holds; neither fails
        out = eng.step({a: f, b: f})
        assert out[a].valid and out[b].valid
    st = eng.kv_stats()
    assert st["free"] == 0 and st["shrunk"] >= 1
    eng.close(a)
    assert eng.kv_stats()["free"] == 20 - eng.lm_state.kv.held(b)
    c = eng.open(None, PROMPT, GREEDY)   # now there is room; its pages are a's, reused
    solo = make_tiny_engine(max_slots=1, window=64)
    s = solo.open(None, PROMPT, GREEDY)
    np.testing.assert_array_equal(_run(eng, c, frames[:20]), _run(solo, s, frames[:20]))


def test_a_session_cut_short_of_pages_steps_as_a_shorter_window_would():
    """Out of pages at 32 positions, a session goes on as an engine whose KV window is 32 does:
    its ring wraps over the pages it holds, keeping its latest history."""
    codes = [np.zeros(1920, np.float32)] * 60
    short = make_tiny_engine(max_slots=1, window=64, kv_pages=8)   # 8 pages of 4: 32 positions
    a = short.open(None, PROMPT, GREEDY)
    ref = make_tiny_engine(max_slots=1, window=64, kv_window=32)
    b = ref.open(None, PROMPT, GREEDY)
    np.testing.assert_array_equal(_run(short, a, codes), _run(ref, b, codes))
    assert short.kv_stats()["shrunk"] == 1 and int(short.lm_state.kv.window_of[a]) == 32
