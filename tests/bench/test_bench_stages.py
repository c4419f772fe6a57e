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
    from hedgehog.cli import main

    with pytest.raises(SystemExit) as e:  # convert's parser: argparse names the option and the accepted values
        main(["bench", "stages", "--batch-scale", "0", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--batch-scale: '0' is not 'auto' or a whole number >= 1" in capsys.readouterr().err
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


def test_decode_and_prefill_run_on_the_shape_model_without_a_download(monkeypatch):
    """`--model smollm2-shape`: the default job's architecture on SmolLM2's shape with random weights (here shrunk),
    the same weights in both models, no tokenizer, nothing fetched: what a lent GPU without the registry can run."""
    from hedgehog.bench import decode, prefill
    from hedgehog.data import assets
    from hedgehog.jobs.config import ConvertJob

    monkeypatch.setattr(stages, "SMOLLM2_135M", {**stages.SMOLLM2_135M, **TINY})
    monkeypatch.setattr(assets, "smollm2_path", lambda: pytest.fail("SmolLM2 was fetched"))
    hh, sm, tok, desc = decode.load_pair(decode.SHAPE_MODEL)
    job = ConvertJob()
    cfg = hh.model.layers[0].self_attn.hh_config
    assert tok is None and "random weights" in desc
    assert (cfg.attention, cfg.sparse_cache, cfg.sinks, cfg.window) == (job.attention, job.sparse_cache, job.sinks,
                                                                        job.window)
    assert torch.equal(hh.model.layers[1].mlp.up_proj.weight, sm.model.layers[1].mlp.up_proj.weight)
    res = decode.run(decode.SHAPE_MODEL, [8, 16], 1, 8, [1], log=lambda *_: None)
    assert [r["context"] for r in res["rows"]] == [8, 16] and res["rows"][0]["hedgehog_context_fill"] == "prefill"
    res = prefill.run(decode.SHAPE_MODEL, [16], log=lambda *_: None, sparse_caches=[0, 128])
    assert set(res["rows"][0]["sparse_cache_s"]) == {"0", "128"}
