"""`ppx-offline` end to end on the golden files, and its answers to bad input."""
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from frontends.offline import main

from conftest import TINY, tiny_files
from serving import installed


def _args(tmp_path, voice, *extra, input_wav=None):
    files = tiny_files()
    prompt = json.loads((TINY / "config.json").read_text())["text_prompt"]
    return ["--input-wav", str(input_wav or TINY / "input.wav"), "--output-wav", str(tmp_path / "out.wav"),
            "--output-text", str(tmp_path / "out.json"), "--voice-prompt", str(voice),
            "--moshi-weight", str(files["moshi_weight"]), "--mimi-weight", str(files["mimi_weight"]),
            "--tokenizer", str(files["tokenizer"]), "--config", str(files["config"]), "--device", "cpu",
            "--text-prompt", prompt, "--greedy", "--no-progress", *extra]


@pytest.mark.parametrize("voice", ["voice.pt", "voice.wav"])
def test_offline_reproduces_the_reference_output(tmp_path, voice):
    """The installed `ppx-offline`, run from another directory, writes the reference's text
    exactly and its audio within one PCM16 step."""
    r = subprocess.run([str(installed("ppx-offline")), *_args(tmp_path, TINY / voice)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads((TINY / "output.json").read_text())
    ours, sr = sf.read(tmp_path / "out.wav", dtype="int16")
    ref, _ = sf.read(TINY / "output.wav", dtype="int16")
    assert sr == 24000 and ours.shape == ref.shape
    assert np.abs(ours.astype(np.int32) - ref).max() <= 1  # within one PCM16 step


def test_voice_names_resolve_in_the_voice_directory(tmp_path):
    vdir = tmp_path / "voices"
    vdir.mkdir()
    (vdir / "NATF2.pt").write_bytes((TINY / "voice.pt").read_bytes())
    out = tmp_path / "o"
    out.mkdir()
    assert main(_args(out, "NATF2", "--voice-prompt-dir", str(vdir))) == 0
    assert main(_args(out, "NATF2.pt", "--voice-prompt-dir", str(vdir))) == 0
    assert json.loads((out / "out.json").read_text()) == json.loads((TINY / "output.json").read_text())


def test_output_has_the_input_length_for_any_rate_and_layout(tmp_path):
    pcm, _ = sf.read(TINY / "input.wav", dtype="float32")
    stereo = np.stack([pcm[:44100], 0.5 * pcm[:44100]], axis=1)
    wav = tmp_path / "in44k.wav"
    sf.write(wav, stereo, 44100, subtype="PCM_24")
    assert main(_args(tmp_path, TINY / "voice.pt", input_wav=wav)) == 0
    out, sr = sf.read(tmp_path / "out.wav")
    assert sr == 24000 and out.shape == (24000,)
    assert len(json.loads((tmp_path / "out.json").read_text())) == 13  # ceil(24000 / 1920)


def _bad(tmp_path, capsys, args):
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    msgs = [line for line in err if line.startswith("error:")]
    assert len(msgs) == 1, err
    assert "Traceback" not in "\n".join(err)
    return msgs[0]


def test_missing_input(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, _args(tmp_path, TINY / "voice.pt", input_wav=tmp_path / "nope.wav"))
    assert "does not exist" in msg


def test_input_that_is_not_audio(tmp_path, capsys):
    txt = tmp_path / "notes.wav"
    txt.write_text("this is not audio")
    assert "not a readable audio file" in _bad(tmp_path, capsys, _args(tmp_path, TINY / "voice.pt", input_wav=txt))


def test_input_that_is_a_directory(tmp_path, capsys):
    assert "not a file" in _bad(tmp_path, capsys, _args(tmp_path, TINY / "voice.pt", input_wav=tmp_path))


def test_empty_wav(tmp_path, capsys):
    wav = tmp_path / "empty.wav"
    sf.write(wav, np.zeros(0, dtype=np.float32), 24000)
    assert "no audio samples" in _bad(tmp_path, capsys, _args(tmp_path, TINY / "voice.pt", input_wav=wav))


def test_voice_made_for_another_model_size(tmp_path, capsys):
    pt = tmp_path / "big.pt"
    torch.save({"embeddings": torch.zeros(5, 1, 1, 4096), "cache": torch.zeros(1, 17, 4, dtype=torch.long)}, pt)
    assert "width 4096" in _bad(tmp_path, capsys, _args(tmp_path, pt))


def test_voice_file_that_is_not_a_voice(tmp_path, capsys):
    pt = tmp_path / "junk.pt"
    pt.write_bytes(b"\x00\x01junk")
    assert "not a voice prompt file" in _bad(tmp_path, capsys, _args(tmp_path, pt))


def test_unknown_voice_name_lists_the_voices(tmp_path, capsys):
    vdir = tmp_path / "voices"
    vdir.mkdir()
    for n in ("NATF0.pt", "VARM1.pt"):
        (vdir / n).write_bytes((TINY / "voice.pt").read_bytes())
    msg = _bad(tmp_path, capsys, _args(tmp_path, "NATF9", "--voice-prompt-dir", str(vdir)))
    assert "NATF9" in msg and "NATF0, VARM1" in msg


def test_unwritable_output(tmp_path, capsys):
    args = _args(tmp_path, TINY / "voice.pt")
    args[args.index("--output-wav") + 1] = str(tmp_path / "no" / "dir" / "out.wav")
    assert "does not exist" in _bad(tmp_path, capsys, args)


def test_bad_sampling_flag(tmp_path, capsys):
    assert "topk_text" in _bad(tmp_path, capsys, _args(tmp_path, TINY / "voice.pt", "--topk-text", "0"))


def test_a_real_process_prints_no_traceback(tmp_path):
    r = subprocess.run([str(installed("ppx-offline")),
                        *_args(tmp_path, TINY / "voice.pt", input_wav=tmp_path / "missing.wav")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.strip().endswith("does not exist")


@pytest.mark.parametrize("bad", ["input", "voice", "output"])
def test_inputs_are_checked_before_the_model_loads(tmp_path, capsys, bad):
    """A bad input WAV, voice or output path is reported before the model is read (with the 7B
    that takes a minute): here the model's files do not even exist, and the error names the
    input, not them."""
    args = _args(tmp_path, tmp_path / "missing.pt" if bad == "voice" else TINY / "voice.pt",
                 input_wav=tmp_path / "missing.wav" if bad == "input" else None)
    if bad == "output":
        args[args.index("--output-text") + 1] = str(tmp_path / "no" / "out.json")
    args[args.index("--moshi-weight") + 1] = str(tmp_path / "no-model.safetensors")
    msg = _bad(tmp_path, capsys, args)
    assert "no-model" not in msg and {"input": "missing.wav", "voice": "missing.pt", "output": "no"}[bad] in msg
