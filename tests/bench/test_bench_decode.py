"""The decode benchmark's batched and equal-memory rows on a tiny model: every (context, batch) row with
tokens/s = batch / step time, rows over the memory budget skipped, the largest batch from the per-sequence
cache bytes (constant for Hedgehog, linear in the context for softmax), and both models decoded there."""
import json

import pytest
import torch


def test_batched_and_equal_memory_rows(tiny_assets, tmp_path):
    from hedgehog.bench import decode

    # budget: the weights plus room for a few softmax sequences at context 64
    probe = decode.load_pair(tiny_assets["model"], "linear")
    weights = decode.weight_bytes(probe[1])
    import torch

    ids = torch.arange(2, 10).view(1, -1)
    kv64 = decode.per_sequence_bytes(probe[1], "softmax", 64, ids)
    memory_gb = (weights + 3.5 * kv64) / decode.GB
    res = decode.run(tiny_assets["model"], [16, 64], steps=2, max_real_prefill=16, batch=[1, 4], log=lambda *_: None,
                     memory_gb=memory_gb, max_batch=64, text=tiny_assets["data"], attention="linear")
    rows = {(r["context"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(16, 1), (16, 4), (64, 1), (64, 4)}
    for r in rows.values():
        assert r["hedgehog_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["hedgehog_ms_per_token"])
    assert "softmax_ms_per_token" not in rows[(64, 4)]  # 4 sequences of KV at 64 do not fit the budget
    assert rows[(64, 1)]["softmax_context_fill"] == "synthetic" and rows[(16, 4)]["hedgehog_context_fill"] == "prefill"
    cap = {r["context"]: r for r in res["capacity"]}
    assert cap[64]["softmax_largest_batch"] == 3
    assert cap[16]["hedgehog_per_sequence_mb"] == pytest.approx(cap[64]["hedgehog_per_sequence_mb"])
    assert cap[64]["softmax_per_sequence_mb"] > 3 * cap[16]["softmax_per_sequence_mb"] * 0.9
    assert cap[64]["hedgehog_batch"] == min(64, cap[64]["hedgehog_largest_batch"]) and cap[64]["throughput_ratio"] > 0
    assert cap[64]["batch_ratio"] == pytest.approx(cap[64]["hedgehog_largest_batch"] / 3)
    decode.plot(res, tmp_path / "decode.png")
    json.dumps(res)
    assert (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.parametrize("argv, stem", [
    (["prefill", "--lengths", "16,32"], "prefill"),
    (["train-step", "--lengths", "16,32", "--tokens", "64", "--mimic-rows", "4"], "train_step"),
    (["decode", "--contexts", "8,16", "--steps", "1", "--batch", "1,2", "--max-real-prefill", "8"], "decode"),
])
def test_every_benchmark_writes_json_and_png(tiny_assets, tmp_path, argv, stem, monkeypatch):
    from hedgehog.cli import main

    if stem in ("prefill", "decode"):
        argv = argv + ["--model", tiny_assets["model"]]
    if stem == "decode":  # real prefills read a corpus: the tiny one instead of Shakespeare
        from hedgehog.bench import decode

        real = decode.run
        monkeypatch.setattr(decode, "run", lambda *a, **kw: real(*a, **{**kw, "text": tiny_assets["data"]}))
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000


def test_prefill_bench_runs_on_the_device_it_is_given(tiny_assets, tmp_path, capsys):
    from hedgehog.bench import prefill
    from conftest import user_error

    res = prefill.run(tiny_assets["model"], [16], device="cpu", log=lambda *_: None)
    row = res["rows"][0]
    assert res["device"] == "cpu" and row["hedgehog_tokens_per_s"] == pytest.approx(16 / row["hedgehog_s"])
    if not torch.cuda.is_available():
        err = user_error(capsys, ["bench", "prefill", "--model", tiny_assets["model"], "--device", "cuda",
                                  "--out", str(tmp_path)])
        assert "sees no CUDA device" in err


@pytest.mark.gpu
def test_prefill_bench_on_cuda_records_peak_memory(tiny_assets):
    from hedgehog.bench import prefill

    res = prefill.run(tiny_assets["model"], [64], device="cuda", log=lambda *_: None)
    assert res["device"].startswith("cuda") and res["rows"][0]["hedgehog_peak_mb"] > 0


def test_synthetic_sparse_cache_fill_has_the_shapes_of_a_real_prefill(tiny_assets):
    """The decode bench's synthetic fill of a sparse-cache state holds as many bytes, field by field, as a real
    prefill of the same length leaves (so its timing and memory rows stand for real ones)."""
    from hedgehog.bench import decode

    hh, _, _, desc = decode.load_pair(tiny_assets["model"], "hybrid", sparse_cache=8)
    assert "sparse cache 8" in desc
    ids = torch.randint(0, hh.config.vocab_size, (1, 200))
    for L in (150, 161, 200):
        real, _ = decode._fill_cache(hh, "hedgehog", L, ids, True)
        fake, _ = decode._fill_cache(hh, "hedgehog", L, ids, False)
        for a, b in zip(real.layers, fake.layers):
            assert [(n, t.shape) for n, t in a.state.tensors()] == [(n, t.shape) for n, t in b.state.tensors()]
            assert (a.state.seen, a.state.boundary) == (b.state.seen, b.state.boundary)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_synthetic_hybrid_fill_has_the_tensors_of_a_real_prefill(tiny_assets, dtype):
    """The decode bench's synthetic fill of a hybrid state without a sparse cache (window ring, sink slots, packed
    state) has the shapes, dtypes and devices a real prefill of the same length leaves, in the model's own dtype."""
    from hedgehog.bench import decode

    hh, sm, _, _ = decode.load_pair(tiny_assets["model"], "hybrid", sparse_cache=0, dtype=dtype)
    ids = torch.randint(0, hh.config.vocab_size, (1, 200))
    for model, kind in ((hh, "hedgehog"), (sm, "softmax")):
        real, _ = decode._fill_cache(model, kind, 150, ids, True, batch=2)
        fake, _ = decode._fill_cache(model, kind, 150, ids, False, batch=2)
        for a, b in zip(real.layers, fake.layers):
            names = a._tensors if kind == "hedgehog" else ("keys", "values")
            shape = lambda layer: [(n, getattr(layer, n).shape, getattr(layer, n).dtype, getattr(layer, n).device)
                                   for n in names]
            assert shape(a) == shape(b)
            assert a.get_seq_length() == b.get_seq_length() == 150


def test_decode_and_train_step_benches_run_on_the_device_they_are_given(tiny_assets, tmp_path, capsys):
    from conftest import user_error

    from hedgehog.bench import decode, train_step

    res = decode.run(tiny_assets["model"], [8, 16], 1, 8, [1], text=tiny_assets["data"], device="cpu",
                     dtype="bf16", log=lambda *_: None)
    assert res["device"] == "cpu" and res["dtype"] == "bf16" and len(res["rows"]) == 2
    res = train_step.run([16], 32, 4, log=lambda *_: None, device="cpu")
    row = res["rows"][0]
    assert res["device"] == "cpu" and row["softmax_tokens_per_s"] == pytest.approx(32 / row["softmax_s"])
    if not torch.cuda.is_available():
        for argv in (["decode", "--model", tiny_assets["model"]], ["train-step"]):
            err = user_error(capsys, ["bench", *argv, "--device", "cuda", "--out", str(tmp_path)])
            assert "sees no CUDA device" in err


@pytest.mark.gpu
def test_decode_and_train_step_benches_on_cuda_record_peak_memory(tiny_assets):
    from hedgehog.bench import decode, train_step

    res = decode.run(tiny_assets["model"], [64], 2, 64, [2], text=tiny_assets["data"], device="cuda", dtype="bf16",
                     log=lambda *_: None)
    row = res["rows"][0]
    assert res["device"].startswith("cuda") and row["hedgehog_peak_mb"] > 0 and row["softmax_peak_mb"] > 0
    res = train_step.run([64], 256, 8, log=lambda *_: None, device="cuda", mixed_precision="bf16")
    assert res["rows"][0]["hedgehog_rows_peak_mb"] > 0


def test_a_named_base_model_is_converted_with_the_jobs_settings(tiny_assets):
    # as `hedgehog convert` would convert it: for the hybrid, its sinks, decay and sparse cache (the library's
    # HedgehogConfig(attention="hybrid") has none of them)
    from hedgehog.bench import decode
    from hedgehog.jobs.config import ConvertJob, hedgehog_config

    for attention in ("hybrid", "linear"):
        model = decode.load_pair(tiny_assets["model"], attention)[0]
        want = hedgehog_config(ConvertJob(attention=attention))
        got = [m.hh_config for m in model.modules() if hasattr(m, "hh_config")]
        assert len(got) == 2 and all(c == want for c in got), (attention, got, want)
