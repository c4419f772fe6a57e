"""The CLI commands end to end on a tiny model + text (the real-model runs are benchmarks)."""
import json
import re
from pathlib import Path

import pytest
from conftest import user_error

from hedgehog.cli import main


def test_convert_eval_generate_end_to_end(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
          "--eval-data", tiny_assets["heldout"],
          "--out", str(out),
          "--seq-len", "32", "--stage1-tokens", "256", "--stage1-batch", "2", "--stage2-tokens", "128",
          "--eval-tokens", "128", "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    for key in ("teacher_ppl", "student_ppl", "ppl_ratio", "attention_kl_before", "attention_kl_after", "stage1",
                "stage2", "settings", "curve"):
        assert key in report
    assert report["stage1"]["tokens"] == 256 and report["stage2"]["tokens"] == 128
    assert report["reload_max_abs_logit_diff"] < 1e-5
    # LoRA is merged into the saved weights: the directory says so, so `eval` loads the base as the teacher
    from hedgehog.models.loading import needs_separate_teacher
    from hedgehog.models.formats import read_meta

    assert read_meta(out / "model")["lora"]["r"] == 8 and needs_separate_teacher(out / "model")
    assert len(report["attention_kl_after"]) == 2
    printed = capsys.readouterr().out
    assert "fidelity to the teacher" in printed and "mean of the held-out texts" in printed
    assert "heldout (held out)" in printed and set(report["fidelity"]["final"]) == {
        "texts (test split)", "heldout (held out)"}
    for stage in ("stage1", "final"):
        f = report["fidelity"][stage]["heldout (held out)"]
        assert f["teacher_ppl"] > 1 and f["student_ppl"] > 1 and 0 <= f["top1_agreement"] <= 1
        assert f["ppl_ratio"] == pytest.approx(f["student_ppl"] / f["teacher_ppl"])
        assert report["held_out"][stage]["ppl_ratio"] == pytest.approx(f["ppl_ratio"])
    # long context in every report: the held-out text at the lengths the model takes, beside the window baseline
    lc = report["long_context"]
    assert lc["lengths"] == [256] and lc["window"] == 64 and lc["sinks"] == 4 and lc["passkey"] == {}
    r256 = lc["texts"]["heldout"]["256"]
    assert r256["tokens"] == 2 * 255 and r256["student"]["ppl_ratio"] > 0 and r256["baseline"]["ppl_ratio"] > 0
    assert lc["mean"]["256"]["student"] == r256["student"]
    assert "long context: the student and the teacher limited to window 64 + 4 sinks" in printed
    assert (out / "long_context.png").exists() and "## Long context" in (out / "model" / "README.md").read_text()
    assert report["settings"]["sinks"] == 4 and read_meta(out / "model")["hedgehog"]["state_decay"] == 0.99
    assert read_meta(out / "model")["hedgehog"]["sparse_cache"] == 128  # the default: stage 2 trained with it
    # resume reuses stage 1
    main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--eval-data",
          tiny_assets["heldout"], "--out", str(out), "--seq-len", "32", "--stage1-tokens", "256", "--stage2-tokens",
          "0", "--eval-tokens", "128", "--no-progress", "--resume"])
    assert json.loads((out / "report.json").read_text())["stage1"].get("resumed") is True
    main(["eval", "--model", str(out / "model"), "--data", tiny_assets["data"], "--eval-data", tiny_assets["heldout"],
          "--seq-len", "32", "--tokens", "128", "--no-progress", "--json", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert "fidelity to the teacher" in printed and "heldout (held out)" in printed
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved) == {"texts (test)", "heldout (held out)", "long_context"}
    assert "heldout" in saved["long_context"]["texts"]
    assert "passkey" in saved["long_context"] and "long context" in printed
    main(["eval", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--seq-len", "32", "--tokens", "128",
          "--no-progress"])
    assert "softmax model" in capsys.readouterr().out
    main(["generate", "--model", str(out / "model"), "--prompt", "the king", "--max-new-tokens", "5"])
    assert "recurrent state" in capsys.readouterr().out
    # the sparse cache is an inference setting of eval and generate; the report says what the student holds
    main(["eval", "--model", str(out / "model"), "--data", tiny_assets["data"], "--eval-data", tiny_assets["heldout"],
          "--seq-len", "32", "--tokens", "128", "--context-lengths", "256", "--passkey-lengths", "",
          "--sparse-cache", "4", "--sparse-chunk", "8", "--no-progress", "--json", str(tmp_path / "sparse.json")])
    assert "a sparse cache of 4 keys" in capsys.readouterr().out
    sparse = json.loads((tmp_path / "sparse.json").read_text())["long_context"]["mean"]["256"]["student"]
    assert sparse["ppl_ratio"] != saved["long_context"]["mean"]["256"]["student"]["ppl_ratio"]
    main(["generate", "--model", str(out / "model"), "--prompt", "the king", "--max-new-tokens", "5",
          "--sparse-cache", "4"])
    assert "recurrent state" in capsys.readouterr().out


def test_stage2_trains_on_its_own_longer_windows(tiny_assets, tmp_path):
    """--stage2-seq-len: stage 2 cuts the training split into windows of that length (same token budget, so fewer
    steps), its position offsets end where those windows still fit, and stage 1 keeps --seq-len. --batch-scale 2
    doubles both stages' batches and budgets (the same steps), and the report records what ran."""
    out = tmp_path / "run"
    main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--eval-data",
          tiny_assets["heldout"], "--out", str(out), "--seq-len", "32", "--stage2-seq-len", "64",
          "--stage1-tokens", "128", "--stage2-tokens", "256", "--eval-tokens", "64", "--context-lengths", "",
          "--passkey-lengths", "", "--no-progress", "--batch-scale", "2", "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    assert report["stage2"]["tokens"] == 512 and report["stage2"]["steps"] == 256 // 64
    assert report["stage1"]["tokens"] == 256 and report["stage1"]["captures"] == 128 // (2 * 32)
    s = report["settings"]
    assert (s["batch_scale"], s["dtype"], s["stage1"]["batch_size"], s["stage2"]["batch_size"]) == (2, "fp32", 4, 2)
    assert s["stage2"]["seq_len"] == 64 and s["seq_len"] == 32
    assert s["stage1"]["position_offsets"] - s["stage2"]["position_offsets"] == 64 - 32


def test_compare_with_hybrid_entry_writes_one_table(tiny_assets, tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
          "--eval-data", tiny_assets["heldout"],
          "--out", str(out),
          "--seq-len", "32", "--stage1-tokens", "128", "--stage2-tokens", "64", "--eval-tokens", "64",
          "--window", "8", "--no-progress", "--feature-maps", "hedgehog,elu,hybrid"])
    res = json.loads((out / "compare.json").read_text())
    assert [r["feature_map"] for r in res["rows"]] == ["hedgehog", "elu", "hybrid"]
    assert all(r["stage1_tokens"] == (0 if r["feature_map"] == "elu" else 128) for r in res["rows"])
    hyb = json.loads((out / "hybrid" / "report.json").read_text())
    assert hyb["settings"]["attention"] == "hybrid" and hyb["settings"]["window"] == 8
    assert (out / "compare.png").stat().st_size > 500
    printed = capsys.readouterr().out
    assert "hybrid" in printed and "teacher ppl" in printed
    main(["generate", "--model", str(out / "hybrid" / "model"), "--prompt", "the king", "--max-new-tokens", "12"])
    assert "recurrent state" in capsys.readouterr().out
    err = user_error(capsys, ["generate", "--model", str(out / "hedgehog" / "model"), "--prompt", "the king",
                              "--sparse-cache", "4"])
    assert "needs a hybrid model" in err
    from hedgehog.eval import analyze

    a = analyze.run(str(out / "hybrid" / "model"), str(tmp_path / "an"), ["elu"], data=tiny_assets["data"],
                    windows=1, seq_len=24, span=12)
    trained = [k for k in a["summary"] if k.endswith("(trained)")]
    assert trained == ["hybrid w=8 + hedgehog (trained)"]
    kl = a["summary"][trained[0]]["kl"]
    assert 0.0 <= kl < float("inf")
    err = user_error(capsys, ["compare", "--out", str(out), "--feature-maps", "hybrid:nope"])
    assert re.search("unknown feature map", err)
    err = user_error(capsys, ["compare", "--out", str(out), "--feature-maps", " , "])
    assert re.search("at least one feature map", err)  # was an UnboundLocalError


def test_analyze_writes_json_summary_and_pngs(tiny_assets, tmp_path):
    from hedgehog.eval import analyze

    a = analyze.run(tiny_assets["model"], str(tmp_path / "an"), ["hedgehog", "elu", "performer", "cosformer"],
                    data=tiny_assets["data"], windows=1, seq_len=24, span=12)
    for f in ("analysis.json", "summary.md", "heatmaps.png", "entropy_per_layer.png", "kl_per_layer.png",
              "monotonicity.png"):
        p = tmp_path / "an" / f
        assert p.exists() and p.stat().st_size > 500, f
    s = a["summary"]
    assert set(s) == {"hedgehog", "elu", "performer", "cosformer"}
    assert all(len(a["per_layer_head"]["elu"]["kl"][layer]) == 4 for layer in range(2))  # per head
    assert "claims" in (tmp_path / "an" / "summary.md").read_text()


def test_cli_errors_are_clear(tmp_path, capsys):
    err = user_error(capsys, ["convert", "--feature-map", "softmaxx", "--out", str(tmp_path / "x")])
    assert re.search("unknown feature map", err)
    assert "does not exist" in user_error(capsys, ["eval", "--model", "/no/such/dir/model", "--no-progress"])
    assert "--lengths must be positive" in user_error(capsys, ["bench", "attention", "--lengths", "0"])
    with pytest.raises(SystemExit):  # argparse: no command
        main([])


def test_bench_attention_small_writes_outputs(tmp_path, capsys):
    main(["bench", "attention", "--lengths", "64,128", "--repeats", "1", "--no-memory", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "attention.json").read_text())
    assert [r["n"] for r in res["rows"]] == [64, 128]
    assert all(r["hedgehog_fwd_s"] > 0 and r["sdpa_fwd_s"] > 0 for r in res["rows"])
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_bench_prefill_small_writes_outputs(tiny_assets, tmp_path, capsys):
    main(["bench", "prefill", "--model", tiny_assets["model"], "--lengths", "16,100", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "prefill.json").read_text())
    assert [r["n"] for r in res["rows"]] == [16, 100]
    assert all(r["hedgehog_s"] > 0 and r["softmax_s"] > 0 and r["speedup"] > 0 for r in res["rows"])
    assert "identity-initialised" in res["model"]
    err = user_error(capsys, [
        "bench", "prefill", "--model", tiny_assets["model"], "--lengths", "0", "--out", str(tmp_path)])
    assert re.search("--lengths", err)
    # the sparse cache's prefill cost, measured in the same run: one time per cache size, the first the baseline
    main(["bench", "prefill", "--model", tiny_assets["model"], "--lengths", "100", "--sparse-cache", "0,8",
          "--out", str(tmp_path)])
    row, = json.loads((tmp_path / "prefill.json").read_text())["rows"]
    assert set(row["sparse_cache_s"]) == {"0", "8"} and row["hedgehog_s"] == row["sparse_cache_s"]["0"]
    assert "cache 8:" in capsys.readouterr().out
    err = user_error(capsys, ["bench", "prefill", "--model", tiny_assets["model"], "--sparse-cache", "-1", "--out",
                              str(tmp_path)])
    assert "--sparse-cache" in err


def test_bench_train_step_small_writes_outputs(tmp_path, capsys):
    main(["bench", "train-step", "--lengths", "16,64", "--tokens", "128", "--mimic-rows", "8", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "train_step.json").read_text())
    assert [(r["n"], r["batch"]) for r in res["rows"]] == [(16, 8), (64, 2)] and res["mimic_rows"] == 8
    for r in res["rows"]:
        assert min(r["softmax_s"], r["hedgehog_all_rows_s"], r["hedgehog_rows_s"]) > 0
        assert r["rows_speedup"] == pytest.approx(r["hedgehog_all_rows_s"] / r["hedgehog_rows_s"])
    assert "all/R" in capsys.readouterr().out
    err = user_error(capsys, ["bench", "train-step", "--lengths", "1", "--out", str(tmp_path)])
    assert re.search("--lengths must be integers >= 2", err)


def test_bench_attention_hybrid_small(tmp_path, capsys):
    main(["bench", "attention", "--attention", "hybrid", "--window", "16", "--lengths", "64,200", "--repeats", "1",
          "--no-memory", "--no-backward", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "attention.json").read_text())
    assert res["config"]["attention"] == "hybrid" and res["config"]["window"] == 16
    assert [r["n"] for r in res["rows"]] == [64, 200] and all(r["fwd_speedup"] > 0 for r in res["rows"])


def test_bench_attention_with_the_sparse_cache(tmp_path, capsys):
    # the default model's attention: the hybrid with a sparse cache, forward and backward, peak memory included
    main(["bench", "attention", "--attention", "hybrid", "--window", "16", "--sparse-cache", "8", "--sparse-chunk",
          "4", "--lengths", "100", "--repeats", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "attention.json").read_text())
    assert res["config"]["sparse_cache"] == {"cache_size": 8, "chunk": 4, "sinks": 4, "decay": 0.99}
    row, = res["rows"]
    assert row["hedgehog_fwd_s"] > 0 and row["hedgehog_fwdbwd_s"] > 0 and row["fwd_speedup"] > 0
    assert row["hedgehog_fwd_peak_mb"] is None or row["hedgehog_fwd_peak_mb"] > 0
    err = user_error(capsys, ["bench", "attention", "--sparse-cache", "8", "--out", str(tmp_path)])
    assert "--attention hybrid" in err
