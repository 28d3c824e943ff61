"""The product calibration's choices kept on disk: a restart on the same GPU and software takes
them instead of timing every shape again; anything else in the file is left alone or ignored."""
from __future__ import annotations

import logging

import pytest
import torch

from engine import switches
from engine.kernels.products import calibration as cal
from engine.kernels.products import choice_cache

from conftest import forget_kernel_choices

PRODUCTS = {(1, 4096, 4096, torch.bfloat16): 5, (8, 11264, 4096, torch.float8_e4m3fn): -1}
FUSED = {(1, 22528, 4096, torch.bfloat16, 1, True, False): 7}


def _tables():
    return {"products": {}, "fused": {}}


def test_choices_round_trip_for_their_context_only(tmp_path):
    path = tmp_path / "c.json"
    assert choice_cache.save(path, "H200 a", {"products": PRODUCTS, "fused": FUSED})
    assert choice_cache.save(path, "H100 b", {"products": {(2, 8, 8, torch.float32): 0}, "fused": {}})
    t = _tables()
    assert choice_cache.load(path, "H200 a", t, n_configs=15) == 3
    assert t == {"products": PRODUCTS, "fused": FUSED}
    t = _tables()
    assert choice_cache.load(path, "H100 b", t, n_configs=15) == 1
    assert t["products"] == {(2, 8, 8, torch.float32): 0}
    assert choice_cache.load(path, "another GPU", _tables(), n_configs=15) == 0


def test_choices_made_in_this_process_win(tmp_path):
    path = tmp_path / "c.json"
    choice_cache.save(path, "ctx", {"products": PRODUCTS, "fused": {}})
    mine = {(1, 4096, 4096, torch.bfloat16): -1}
    assert choice_cache.load(path, "ctx", {"products": mine}, n_configs=15) == 1
    assert mine[(1, 4096, 4096, torch.bfloat16)] == -1


def test_entries_that_do_not_fit_are_skipped(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"ctx": {"products": {"[1, 8, 8, \\"dtype:bfloat16\\"]": 99, "[1, 8, 8, \\"dtype:os\\"]": 0, '
                    '"[[1], 8]": 0, "not json": 0, "[2, 8, 8, \\"dtype:float16\\"]": 3, '
                    '"[3, 8, 8, \\"dtype:float16\\"]": "3"}, "fused": []}}')
    t = _tables()
    assert choice_cache.load(path, "ctx", t, n_configs=15) == 1
    assert t["products"] == {(2, 8, 8, torch.float16): 3}


def test_a_damaged_file_is_ignored_with_a_warning_and_then_replaced(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text("{half a file")
    with caplog.at_level(logging.WARNING, logger="ppx.kernels"):
        assert choice_cache.load(path, "ctx", _tables(), n_configs=15) == 0
    assert "ignoring the kernel choices" in caplog.text
    assert choice_cache.save(path, "ctx", {"products": PRODUCTS, "fused": {}})
    t = _tables()
    assert choice_cache.load(path, "ctx", t, n_configs=15) == 2


def test_an_unwritable_place_warns_and_keeps_going(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="ppx.kernels"):
        assert not choice_cache.save(blocker / "ppx" / "c.json", "ctx", {"products": PRODUCTS})
    assert "PPX_KERNEL_CACHE" in caplog.text
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("value,expect", [("0", None), ("off", None), ("{tmp}/mine", "{tmp}/mine"),
                                          (None, "{tmp}/xdg/ppx")])
def test_the_folder_follows_the_environment(monkeypatch, tmp_path, value, expect):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if value is None:
        monkeypatch.delenv("PPX_KERNEL_CACHE", raising=False)
    else:
        monkeypatch.setenv("PPX_KERNEL_CACHE", value.format(tmp=tmp_path))
    monkeypatch.setattr(switches, "KERNEL_CACHE", switches._kernel_cache())  # (as a process starting now reads it)
    got = choice_cache.cache_file()
    assert got == (None if expect is None else tmp_path.joinpath(expect.format(tmp="").lstrip("/"), choice_cache.FILE))


def test_the_linear_calibration_keeps_and_rereads_its_choices(monkeypatch, tmp_path):
    """What `linear` times is written as it is chosen; a new process (fresh tables) on the same
    GPU and kernels reads it back before timing anything, and counts it; kernels whose source
    differs read nothing."""
    monkeypatch.setattr(switches, "KERNEL_CACHE", tmp_path)
    monkeypatch.setattr(choice_cache, "context", lambda device, digest: f"test GPU {digest}")

    def fresh_process():
        forget_kernel_choices(monkeypatch)

    fresh_process()
    cal._read_kept_choices(torch.device("cpu"))
    assert cal.calibration_stats()["from_cache"] == 0
    cal._choice.update(PRODUCTS)  # as `kernel_for` records a timed pick
    cal._keep_choices()
    cal._fused_choice.update(FUSED)
    cal._keep_choices()

    fresh_process()
    cal._read_kept_choices(torch.device("cpu"))
    assert cal._choice == PRODUCTS and cal._fused_choice == FUSED
    assert cal.calibration_stats()["from_cache"] == 3

    fresh_process()
    monkeypatch.setattr(choice_cache, "sources_digest", lambda *paths: "edited kernels")
    cal._read_kept_choices(torch.device("cpu"))
    assert cal._choice == {} and cal.calibration_stats()["from_cache"] == 0
