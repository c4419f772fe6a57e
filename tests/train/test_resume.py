"""Mid-stage checkpoints: a conversion killed inside a stage resumes where it stopped and ends where an
uninterrupted run ends; checkpoints are written atomically; a resume with other settings is refused."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from hedgehog.errors import CheckpointError
from hedgehog.train.resume import StageCheckpoint, settings_diff

# 8 stage-2 steps, a checkpoint every 3: the kill after step 5 loses steps 4-5, which the resume redoes.
ARGS = ["--seq-len", "32", "--stage1-tokens", "256", "--stage1-batch", "2", "--stage1-checkpoint-every", "1",
        "--stage2-tokens", "256", "--stage2-checkpoint-every", "3", "--eval-tokens", "128", "--no-progress"]

KILLER = textwrap.dedent("""
    import os, signal, sys
    from hedgehog.cli import main
    from hedgehog.train.engine import Engine

    kill_after, real, done = int(sys.argv[1]), Engine.step, [0]

    def step_then_maybe_die(*a, **kw):  # SIGKILL after a stage 2 step: no clean-up, no atexit
        real(*a, **kw)
        done[0] += not kw.get("sync")  # stage 1's steps average the maps' gradients by hand (sync=True)
        if done[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    Engine.step = step_then_maybe_die
    main(sys.argv[2:])
""")


def convert(tiny_assets, out, *extra):
    from hedgehog.cli import main

    assert main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                 "--eval-data", tiny_assets["heldout"],
                 "--out", str(out),
                 *ARGS, *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_kill_in_stage_2_then_resume_equals_uninterrupted(tiny_assets, tmp_path):
    ref = convert(tiny_assets, tmp_path / "ref")
    killed = tmp_path / "killed"
    argv = ["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
            "--eval-data", tiny_assets["heldout"],
            "--out", str(killed), *ARGS]
    proc = subprocess.run([sys.executable, "-c", KILLER, "5", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "report.json").exists()
    state = torch.load(killed / "checkpoints" / "stage2.pt", weights_only=True)  # whole, not half-written
    assert state["step"] == 3 and len(state["history"]) == 3

    res = convert(tiny_assets, killed, "--resume")
    assert res["stage1"]["resumed"] and res["stage2"]["resumed"]
    assert res["stage2"]["steps"] == ref["stage2"]["steps"] == 8
    assert res["student_ppl"] == pytest.approx(ref["student_ppl"], rel=1e-6)
    assert res["student_ppl_stage1"] == pytest.approx(ref["student_ppl_stage1"], rel=1e-6)
    assert res["stage2"]["loss_curve"] == ref["stage2"]["loss_curve"]
    assert [(c["stage"], c["tokens"]) for c in res["curve"]] == [(c["stage"], c["tokens"]) for c in ref["curve"]]
    assert [c["val_ppl"] for c in res["curve"]] == pytest.approx([c["val_ppl"] for c in ref["curve"]], rel=1e-6)


def test_stage_1_resumes_mid_stage(tiny_assets, tmp_path, monkeypatch):
    """A crash inside stage 1 (an exception while batch 2 of 4 reports) resumes at batch 2, not at batch 1."""
    from hedgehog.jobs import pipeline

    ref = convert(tiny_assets, tmp_path / "ref", "--stage2-tokens", "0")
    real = pipeline.attention_transfer

    def crash_after_two(model, windows, cfg, callback=None, **kw):
        def cb(rec):
            callback(rec)
            if rec["batch"] == 2:
                raise KeyboardInterrupt
        return real(model, windows, cfg, callback=cb, **kw)

    out = tmp_path / "crashed"
    monkeypatch.setattr(pipeline, "attention_transfer", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_assets, out, "--stage2-tokens", "0")
    monkeypatch.undo()
    assert torch.load(out / "checkpoints" / "stage1.pt", weights_only=True)["batch"] == 1
    res = convert(tiny_assets, out, "--stage2-tokens", "0", "--resume")
    assert res["stage1"]["resumed"] and len(res["stage1"]["loss_curve"]) == 4
    assert res["stage1"]["loss_curve"] == ref["stage1"]["loss_curve"]
    assert res["student_ppl"] == pytest.approx(ref["student_ppl"], rel=1e-6)


def test_resume_with_other_settings_is_refused_with_their_names(tiny_assets, tmp_path, capsys):
    from conftest import user_error

    out = tmp_path / "run"
    convert(tiny_assets, out, "--stage2-tokens", "0")
    err = user_error(capsys, ["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                              "--eval-data", tiny_assets["heldout"],
                              "--out",
                              str(out), *ARGS, "--stage2-tokens", "0", "--stage1-lr", "0.02", "--resume"])
    assert "other settings" in err and "stage1.lr: checkpoint 0.01, now 0.02" in err
    # stage 1's checkpoint does not depend on stage 2's settings: a new stage 2 may follow a finished stage 1
    res = convert(tiny_assets, out, "--stage2-tokens", "64", "--resume")
    assert res["stage1"]["resumed"] and res["stage2"]["tokens"] == 64


def test_truncated_stage_checkpoint_is_refused(tiny_assets, tmp_path, capsys):
    from conftest import user_error

    out = tmp_path / "run"
    convert(tiny_assets, out, "--stage2-tokens", "0")
    ck = out / "checkpoints" / "stage1.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    err = user_error(capsys, ["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                              "--eval-data", tiny_assets["heldout"],
                              "--out",
                              str(out), *ARGS, "--stage2-tokens", "0", "--resume"])
    assert "stage1.pt cannot be read" in err and "truncated or corrupt" in err


def test_stage_checkpoint_round_trip_and_settings_diff(tmp_path):
    extra = {"curve": []}
    ck = StageCheckpoint(tmp_path / "s.pt", every=2, settings={"a": 1, "stage": {"lr": 0.1}}, extra=extra)
    assert ck.load() is None and ck.due(4) and not ck.due(3)
    extra["curve"].append({"tokens": 8})
    ck.save({"step": 4, "params": [torch.ones(2)]})
    fresh = {}
    state = StageCheckpoint(tmp_path / "s.pt", 2, {"a": 1, "stage": {"lr": 0.1}}, fresh).load()
    assert state["step"] == 4 and fresh == {"curve": [{"tokens": 8}]}
    with pytest.raises(CheckpointError, match=r"stage\.lr: checkpoint 0\.1, now 0\.2"):
        StageCheckpoint(tmp_path / "s.pt", 2, {"a": 1, "stage": {"lr": 0.2}}).load()
    assert settings_diff({"x": {"y": 1}}, {"x": {"y": 1}}) == []
    assert settings_diff({"x": 1}, {"z": 2}) == ["x: checkpoint 1, now None", "z: checkpoint None, now 2"]


def test_resume_onto_another_base_model_is_refused(tiny_assets, tmp_path, capsys):
    from conftest import other_base_model, user_error

    out = tmp_path / "run"
    convert(tiny_assets, out, "--stage2-tokens", "0")
    other = other_base_model(tiny_assets["model"], tmp_path / "other")
    err = user_error(capsys, ["convert", "--model", other, "--data", tiny_assets["data"], "--eval-data",
                              tiny_assets["heldout"], "--out", str(out), *ARGS, "--stage2-tokens", "0", "--resume"])
    assert "other settings" in err and "base_fingerprint.embedding_sha1" in err
