"""`ppx-offline` over many files at once (a folder or a manifest), run as slots of one engine:
each item's outputs equal a one-file run's byte for byte (CPU, golden model), bad items are
reported and skipped, finished items are skipped on --resume, --stereo-output lays out both
speakers."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from frontends.offline import main

from conftest import TINY, tiny_files
from serving import installed

PROMPT = json.loads((TINY / "config.json").read_text())["text_prompt"]


def _model_args():
    f = tiny_files()
    return ["--moshi-weight", str(f["moshi_weight"]), "--mimi-weight", str(f["mimi_weight"]), "--tokenizer",
            str(f["tokenizer"]), "--config", str(f["config"]), "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Three recordings of different lengths (5 s, 11 s, 18.4 s; one FLAC, one 24-bit stereo), in
    a folder with a subfolder, and a voice directory."""
    root = tmp_path_factory.mktemp("batch")
    pcm, rate = sf.read(TINY / "input.wav", dtype="float32")
    (root / "in" / "sub").mkdir(parents=True)
    sf.write(root / "in" / "a.wav", pcm[: 5 * rate], rate)
    sf.write(root / "in" / "sub" / "b.flac", pcm[3 * rate: 14 * rate], rate)
    sf.write(root / "in" / "c.wav", np.stack([pcm, 0.3 * pcm], 1), rate, subtype="PCM_24")
    voices = root / "voices"
    voices.mkdir()
    shutil.copy(TINY / "voice.pt", voices / "NATF2.pt")
    shutil.copy(TINY / "voice.wav", voices / "VARM0.wav")
    return root


def _single(tmp, recording, voice, voice_dir, *flags):
    out = tmp / f"single-{recording.stem}-{voice}"
    out.mkdir(exist_ok=True)
    assert main(["--input-wav", str(recording), "--output-wav", str(out / "a.wav"), "--output-text",
                 str(out / "a.json"), "--voice-prompt", voice, "--voice-prompt-dir", str(voice_dir),
                 "--text-prompt", PROMPT, *_model_args(), *flags]) == 0
    return (out / "a.wav").read_bytes(), (out / "a.json").read_bytes()


@pytest.mark.parametrize("mode", [["--greedy"], ["--seed", "7"]])
def test_a_folder_gives_what_one_file_runs_give(recordings, tmp_path, mode):
    """The installed ppx-offline over a folder, two items at a time (the third takes the first
    free slot), writes each item's outputs byte for byte as a one-file run does, greedy and
    sampled."""
    out = tmp_path / "out"
    r = subprocess.run([str(installed("ppx-offline")), "--input-dir", str(recordings / "in"), "--output-dir",
                        str(out), "--batch-size", "2", "--voice-prompt", "NATF2", "--voice-prompt-dir",
                        str(recordings / "voices"), "--text-prompt", PROMPT, *_model_args(), *mode],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 of 3 items done" in r.stderr and "x real time, 2 at a time" in r.stderr
    for rel in ("a", "sub/b", "c"):
        src = next((recordings / "in").glob(rel + ".*"))
        wav, text = _single(tmp_path, src, "NATF2", recordings / "voices", *mode)
        assert (out / f"{rel}.wav").read_bytes() == wav, rel
        assert (out / f"{rel}.json").read_bytes() == text, rel
    assert sf.info(out / "sub" / "b.wav").frames == 11 * 24000


def test_a_manifest_sets_each_items_voice_prompt_and_seed(recordings, tmp_path):
    man = tmp_path / "items.jsonl"
    rows = [{"input": str(recordings / "in" / "a.wav"), "voice_prompt": "VARM0", "seed": 3},
            {"input": str(recordings / "in" / "c.wav"), "text_prompt": "You are terse.", "seed": 11,
             "output_wav": "c-out.wav", "output_text": "c-out.json"}]
    man.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["--manifest", str(man), "--output-dir", str(tmp_path / "out"), "--voice-prompt", "NATF2",
                 "--voice-prompt-dir", str(recordings / "voices"), "--text-prompt", PROMPT, *_model_args()]) == 0
    wav, text = _single(tmp_path, recordings / "in" / "a.wav", "VARM0", recordings / "voices", "--seed", "3")
    assert (tmp_path / "out" / "a.wav").read_bytes() == wav and (tmp_path / "out" / "a.json").read_bytes() == text
    single = tmp_path / "single-c"
    single.mkdir()
    assert main(["--input-wav", str(recordings / "in" / "c.wav"), "--output-wav", str(single / "c.wav"),
                 "--output-text", str(single / "c.json"), "--voice-prompt", "NATF2", "--voice-prompt-dir",
                 str(recordings / "voices"), "--text-prompt", "You are terse.", "--seed", "11", *_model_args()]) == 0
    assert (tmp_path / "c-out.wav").read_bytes() == (single / "c.wav").read_bytes()
    assert (tmp_path / "c-out.json").read_bytes() == (single / "c.json").read_bytes()


def test_bad_items_are_reported_and_skipped(recordings, tmp_path):
    (tmp_path / "junk.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 24000)
    man = tmp_path / "items.jsonl"
    lines = [json.dumps({"input": str(recordings / "in" / "a.wav")}),
             json.dumps({"input": "junk.wav"}),
             json.dumps({"input": "empty.wav"}),
             json.dumps({"input": "missing.wav"}),
             json.dumps({"input": str(recordings / "in" / "a.wav"), "output_wav": "v.wav", "output_text": "v.json",
                         "voice_prompt": "NOPE"}),
             "{not json",
             json.dumps({"input": str(recordings / "in" / "a.wav"), "output_wav": "k.wav", "output_text": "k.json",
                         "topk_text": 0})]
    man.write_text("\n".join(lines) + "\n")
    r = subprocess.run([str(installed("ppx-offline")), "--manifest", str(man), "--output-dir", str(tmp_path / "out"),
                        "--voice-prompt", "NATF2", "--voice-prompt-dir", str(recordings / "voices"), "--greedy",
                        *_model_args()], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "1 of 7 items done" in r.stderr and "6 failed:" in r.stderr
    failed = r.stderr.split("6 failed:")[1].strip().splitlines()
    assert len(failed) == 6
    for name, why in (("junk.wav", "not a readable audio file"), ("empty.wav", "no audio samples"),
                      ("missing.wav", "does not exist"), ("line 5", "NOPE"), ("line 6", "not a valid item"),
                      ("line 7", "topk_text")):
        assert any(name in line and why in line for line in failed), (name, why, failed)
    assert (tmp_path / "out" / "a.wav").is_file() and not (tmp_path / "v.wav").exists()


def test_resume_skips_the_items_already_done(recordings, tmp_path):
    args = ["--input-dir", str(recordings / "in"), "--output-dir", str(tmp_path / "out"), "--voice-prompt", "NATF2",
            "--voice-prompt-dir", str(recordings / "voices"), "--greedy", *_model_args()]
    (tmp_path / "out").mkdir()
    sf.write(tmp_path / "out" / "a.wav", np.zeros(10, dtype=np.float32), 24000)
    (tmp_path / "out" / "a.json").write_text("[]")
    assert main(args + ["--resume"]) == 0
    assert sf.info(tmp_path / "out" / "a.wav").frames == 10  # left as it was
    assert (tmp_path / "out" / "c.json").is_file() and (tmp_path / "out" / "sub" / "b.json").is_file()


def test_stereo_output_holds_the_user_and_the_agent(recordings, tmp_path, capsys):
    args = ["--input-wav", str(recordings / "in" / "c.wav"), "--voice-prompt", "NATF2", "--voice-prompt-dir",
            str(recordings / "voices"), "--greedy", *_model_args()]
    assert main(args + ["--output-wav", str(tmp_path / "m.wav"), "--output-text", str(tmp_path / "m.json")]) == 0
    assert main(args + ["--output-wav", str(tmp_path / "s.wav"), "--output-text", str(tmp_path / "s.json"),
                        "--stereo-output"]) == 0
    mono, _ = sf.read(tmp_path / "m.wav", dtype="int16")
    stereo, rate = sf.read(tmp_path / "s.wav", dtype="int16")
    user, _ = sf.read(recordings / "in" / "c.wav", dtype="float32")
    assert rate == 24000 and stereo.shape == (mono.shape[0], 2)
    assert np.array_equal(stereo[:, 1], mono)  # channel 1: the agent
    assert np.abs(stereo[:, 0] / 32768 - user[:, 0]).max() < 1e-4  # channel 0: the user's first channel
