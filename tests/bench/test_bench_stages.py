"""`hedgehog bench stages`: the default job's stage 1 and stage 2 throughput on a model of a given shape."""
import json

import pytest
import torch

from hedgehog.bench import stages

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300)


def test_rate_leaves_the_first_batch_out():
    hist = [{"tokens": 100, "seconds": 5.0}, {"tokens": 200, "seconds": 5.5}, {"tokens": 300, "seconds": 6.0}]
    assert stages.tokens_per_second(hist) == pytest.approx(200.0)
    assert stages.tokens_per_second(hist[:1]) is None


def test_runs_both_stages_with_the_jobs_batches_for_the_device(tmp_path):
    from hedgehog.jobs.config import ConvertJob, stage2_seq_len

    res = stages.run("cpu", batch_scale=2, batches=2, shape=TINY, log=lambda *_: None)
    job = ConvertJob()
    s1, s2 = res["stage1"], res["stage2"]
    assert res["config"]["batch_scale"] == 2 and res["config"]["dtype"] == "fp32" and res["config"]["layers"] == 2
    assert (s1["batch_size"], s1["seq_len"]) == (2 * job.stage1.batch_size, job.seq_len)
    assert (s2["batch_size"], s2["seq_len"]) == (2 * job.stage2.batch_size, stage2_seq_len(job))
    assert s1["tokens"] == 2 * s1["batch_size"] * s1["seq_len"] and s2["tokens"] == 2 * s2["batch_size"] * s2["seq_len"]
    # the rate covers the second batch only: at most its tokens over the stage's whole time
    for s in (s1, s2):
        assert s["tokens_per_s"] > s["tokens"] / 2 / s["seconds"] and s["peak_mb"] is None
    json.dumps(res)


def test_cli_refuses_bad_settings(capsys, tmp_path):
    from conftest import user_error

    assert "--batches must be at least 2" in user_error(capsys, ["bench", "stages", "--batches", "1",
                                                                 "--out", str(tmp_path)])
    assert "--batch-scale must be" in user_error(capsys, ["bench", "stages", "--batch-scale", "0",
                                                          "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        assert "sees no CUDA device" in user_error(capsys, ["bench", "stages", "--device", "cuda",
                                                            "--out", str(tmp_path)])


@pytest.mark.gpu
def test_stages_bench_on_cuda_uses_the_cuda_recipe():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    res = stages.run("cuda", batches=2, shape=TINY, log=lambda *_: None)
    assert res["config"]["dtype"] == "bf16" and res["config"]["batch_scale"] == 8
    assert res["stage1"]["peak_mb"] > 0 and res["stage2"]["tokens_per_s"] > 0
