"""Loading checkpoints: strict names, shapes, the 8-step depformer, hub errors, the 7B size."""
import re
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import weights as W
from engine.config import PERSONAPLEX_7B, load_config
from engine.lm import LM, count_parameters
from engine.mimi import Mimi
from engine.random_weights import lm_checkpoint_shapes, random_lm_state_dict, random_mimi_state_dict

from conftest import TINY


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY / "config.json")


@pytest.fixture(scope="module")
def golden_sd():
    return load_file(str(TINY / "lm.safetensors"))


def _load(cfg, path):
    model = W.materialize(lambda dtype: LM(cfg.lm, dtype=dtype), "cpu", torch.float32)
    W.load_lm_weights(model, path, cfg.lm)
    return model


def test_loads_every_parameter_with_the_checkpoint_values(cfg, golden_sd, tmp_path):
    model = _load(cfg, TINY / "lm.safetensors")
    torch.testing.assert_close(model.layers[1].ffn_in.weight, golden_sd["transformer.layers.1.gating.linear_in.weight"].float())
    torch.testing.assert_close(model.depformer.layers[0].ffn_out.weight[5],
                               golden_sd["depformer.layers.0.gating.5.linear_out.weight"].float())
    torch.testing.assert_close(model.out_norm, golden_sd["out_norm.alpha"].float().view(-1))
    torch.testing.assert_close(model.emb[3], golden_sd["emb.3.weight"].float())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_a_bad_key_is_an_error_that_names_it(cfg, golden_sd, tmp_path, case):
    sd = dict(golden_sd)
    key = "transformer.layers.1.self_attn.out_proj.weight"
    if case == "missing":
        del sd[key]
    elif case == "extra":
        key = "transformer.layers.9.norm1.alpha"
        sd[key] = torch.ones(1, 1, 64, dtype=torch.bfloat16)
    else:
        sd[key] = sd[key][:, :32].contiguous()
    path = tmp_path / "lm.safetensors"
    save_file(sd, str(path))
    with pytest.raises(W.WeightsError, match=re.escape(f"'{key}'")) as e:
        _load(cfg, path)
    assert case in str(e.value) or (case == "extra" and "unexpected" in str(e.value)) \
        or (case == "shape" and "has shape" in str(e.value))


def test_an_eight_step_depformer_is_extended_as_the_reference_does(cfg, golden_sd, tmp_path):
    sd = {}
    for k, v in golden_sd.items():
        m = re.match(r"^(depformer\.layers\.\d+\.gating|linears|depformer_in|depformer_emb)\.(\d+)\.", k)
        if m and int(m.group(2)) >= 8:
            continue
        if k.startswith("depformer.layers.") and "self_attn" in k:
            v = v[: v.shape[0] // 2].contiguous()  # the first 8 steps
        sd[k] = v
    path = tmp_path / "lm8.safetensors"
    save_file(sd, str(path))
    model = _load(cfg, path)
    dep = model.depformer
    for k in range(8, 16):
        torch.testing.assert_close(dep.layers[1].ffn_in.weight[k], dep.layers[1].ffn_in.weight[k - 8])
        torch.testing.assert_close(dep.layers[0].attn_in.weight[k], dep.layers[0].attn_in.weight[k - 8])
        torch.testing.assert_close(dep.heads.weight[k], dep.heads.weight[k - 8])
        torch.testing.assert_close(dep.inp.weight[k], dep.inp.weight[k - 8])
    for k in range(8, 15):
        torch.testing.assert_close(dep.emb[k], dep.emb[k - 8])
    torch.testing.assert_close(dep.layers[0].attn_in.weight[:8],
                               golden_sd["depformer.layers.0.self_attn.in_proj_weight"].float().view(16, 96, 32)[:8])


def test_not_a_checkpoint_is_a_clear_error(cfg, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("hello")
    with pytest.raises(W.WeightsError, match="not a readable safetensors"):
        _load(cfg, bad)
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.resolve_file(tmp_path / "nope.safetensors", W.LM_FILE)


def test_mimi_checkpoint_errors_name_the_key(cfg, tmp_path):
    sd = load_file(str(TINY / "mimi.safetensors"))
    del sd["decoder.model.2.convtr.convtr.bias"]
    path = tmp_path / "mimi.safetensors"
    save_file(sd, str(path))
    m = W.materialize(lambda dtype: Mimi(cfg.mimi, dtype=dtype), "cpu", torch.float32)
    with pytest.raises(W.WeightsError, match=re.escape("'decoder.model.2.convtr.convtr.bias'")):
        W.load_mimi_weights(m, path, cfg.mimi)


def test_random_checkpoints_load_through_the_real_loader(cfg, tmp_path):
    save_file(random_lm_state_dict(cfg.lm, 3), str(tmp_path / "lm.safetensors"))
    save_file(random_mimi_state_dict(cfg.mimi, 3), str(tmp_path / "mimi.safetensors"))
    _load(cfg, tmp_path / "lm.safetensors")
    m = W.materialize(lambda dtype: Mimi(cfg.mimi, dtype=dtype), "cpu", torch.float32)
    W.load_mimi_weights(m, tmp_path / "mimi.safetensors", cfg.mimi)


def test_the_7b_config_has_the_reference_parameter_count():
    model = LM(PERSONAPLEX_7B.lm, device="meta")
    n = count_parameters(model)
    assert round(n / 1e9, 2) == 8.37
    assert round((count_parameters(model.layers) + model.emb.numel()) / 1e9, 2) == 6.71
    assert set(lm_checkpoint_shapes(PERSONAPLEX_7B.lm)) == set(W.expand_table(W.LM_NAME_TABLE,
                                                                              W._lm_ranges(PERSONAPLEX_7B.lm)))


@pytest.fixture()
def hub(monkeypatch):
    """engine.hub with its one-per-process reachability probe forgotten before and after."""
    from engine import hub

    hub.reachable.cache_clear()
    hub._warn_once.cache_clear()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "token", lambda: None)
    yield hub
    monkeypatch.undo()
    hub.reachable.cache_clear()
    hub._warn_once.cache_clear()


@pytest.mark.parametrize("exc, want", [("GatedRepoError", "is gated"), ("RepositoryNotFoundError", "not found"),
                                       ("LocalEntryNotFoundError", "did not answer")])
def test_hub_failures_say_what_to_do(hub, monkeypatch, exc, want):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(*a, **k):
        cls = getattr(errors, exc)
        err = cls.__new__(cls)  # their constructors want a live HTTP response
        Exception.__init__(err, "boom")
        raise err

    monkeypatch.setattr(hub, "reachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(hub.HubError, match=want) as e:
        W.resolve_file(None, W.LM_FILE, "nvidia/personaplex-7b-v1")
    msg = str(e.value)
    assert "\n" not in msg and "--moshi-weight" in msg and "ppx-serve --demo" in msg
    if exc != "LocalEntryNotFoundError":
        assert "set HF_TOKEN" in msg and "huggingface.co/nvidia/personaplex-7b-v1" in msg


def test_an_unreachable_hub_fails_in_one_try(hub, monkeypatch, caplog):
    """No retries for half a minute: one connection attempt, then one sentence that names what
    to do; huggingface_hub is never asked."""
    import time

    import huggingface_hub

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(hub, "_endpoint", lambda: ("127.0.0.1", closed))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the hub was asked"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    t0 = time.monotonic()
    for _ in range(3):  # the model's three files: one probe in all
        with pytest.raises(hub.HubError) as e:
            W.resolve_file(None, W.MIMI_FILE, "nvidia/personaplex-7b-v1")
    assert time.monotonic() - t0 < hub.PROBE_SECONDS
    msg = str(e.value)
    assert "cannot be reached" in msg and "set HF_TOKEN" in msg and "--moshi-weight" in msg
    assert "ppx-serve --demo" in msg and "\n" not in msg
    assert hub.reachable.cache_info().misses == 1


def test_an_unreachable_hub_uses_the_cached_files_with_one_warning(hub, monkeypatch, tmp_path, caplog):
    import huggingface_hub

    cached = tmp_path / "model.safetensors"
    cached.write_bytes(b"x")
    monkeypatch.setattr(hub, "reachable", lambda: "huggingface.co cannot be reached (no route)")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: str(cached))
    with caplog.at_level("WARNING", logger="ppx.hub"):
        assert W.resolve_file(None, W.LM_FILE) == cached
        assert W.resolve_file(None, W.LM_FILE) == cached
    assert [r.getMessage() for r in caplog.records] == [
        "huggingface.co cannot be reached (no route): using the cached copies of the hub's files"]


def test_offline_mode_does_not_touch_the_network(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "reachable", lambda: pytest.fail("probed the network"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set") as e:
        W.resolve_file(None, W.LM_FILE, "nvidia/personaplex-7b-v1")
    assert "not cached" in str(e.value)
