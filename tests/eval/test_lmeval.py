"""lm-evaluation-harness offline: the `hedgehog` model type on local tasks (multiple choice, rolling
loglikelihood, generation), teacher vs student, through the library, `hedgehog eval --tasks` and
`hedgehog lm-eval` and a plain `lm_eval`."""
import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra; `make setup` installs it")

from hedgehog.eval import lmeval  # noqa: E402


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory, tiny_assets):
    """A cloze task written by hedgehog, plus a rolling-perplexity and a generation task, all local JSONL."""
    from pathlib import Path

    root = tmp_path_factory.mktemp("tasks")
    docs = [p.read_text() for p in sorted(Path(tiny_assets["heldout"]).glob("*.txt"))]
    lmeval.write_cloze_task(docs, root, n=12, context_words=12, answer_words=3)
    rows = [{"text": d[:400]} for d in docs]
    (root / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'ppl.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n")
    gen = [{"prompt": " ".join(d.split()[:8]), "answer": d.split()[8]} for d in docs]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"<eos>\"]\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return str(root)


def test_cloze_task_file_is_well_formed(tmp_path):
    docs = [" ".join(f"w{i}" for i in range(400))]
    out = lmeval.write_cloze_task(docs, tmp_path, n=20, context_words=10, answer_words=3, choices=4)
    items = [json.loads(line) for line in (out / "heldout_cloze.jsonl").read_text().splitlines()]
    assert len(items) == 20
    for it in items:
        assert len(it["choices"]) == len(set(it["choices"])) == 4
        first = int(it["context"].split()[0][1:])
        assert it["choices"][it["label"]] == " ".join(f"w{first + 10 + j}" for j in range(3))  # the true next words
    assert "output_type: multiple_choice" in (out / "heldout_cloze.yaml").read_text()


def test_student_and_teacher_through_lm_eval(tiny_run, local_tasks):
    res = lmeval.compare_tasks(str(tiny_run / "model"), ["heldout_cloze", "tiny_ppl", "tiny_gen"],
                               include_path=local_tasks, batch_size=3)
    rows = {(r["task"], r["metric"]): r for r in res["rows"]}
    for key in (("heldout_cloze", "acc"), ("heldout_cloze", "acc_norm"), ("tiny_ppl", "word_perplexity"),
                ("tiny_gen", "exact_match")):
        assert key in rows, sorted(rows)
    assert 0 <= rows[("heldout_cloze", "acc")]["student"] <= 1
    r = rows[("tiny_ppl", "word_perplexity")]
    assert r["teacher"] > 1 and r["student"] > 1 and r["ratio"] == pytest.approx(r["student"] / r["teacher"])
    table = lmeval.format_table(res)
    assert "| heldout_cloze | acc |" in table and "student / teacher" in table


@pytest.mark.parametrize("teacher", [False, True])
def test_batched_loglikelihood_equals_a_float64_forward(tiny_run, teacher):
    """lm-eval's batched (padded) loglikelihood of the hedgehog model type against our own forward."""
    from lm_eval.api.instance import Instance

    from hedgehog.models.loading import load
    from hedgehog.models.loading import load_base
    from hedgehog.models.formats import read_meta

    lm = lmeval.model_class()(pretrained=str(tiny_run / "model"), teacher=teacher, batch_size=3)
    reqs = [("the king and the", " queen"), ("thou art", " fair and sweet"), ("love", " death night day")]
    out = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                            for i, r in enumerate(reqs)])
    if teacher:
        model, tok, _ = load_base(read_meta(tiny_run / "model")["base_model"])
    else:
        model, tok = load(tiny_run / "model")
    for (ctx, cont), (ll, _) in zip(reqs, out):
        c, w = tok(ctx).input_ids, tok(ctx + cont).input_ids
        ids = torch.tensor([w])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        ref = sum(logp[i - 1, w[i]].item() for i in range(len(c), len(w)))
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_eval_tasks_cli_writes_json_and_markdown(tiny_run, local_tasks, tmp_path, capsys):
    from hedgehog.cli import main

    main(["eval", "--model", str(tiny_run / "model"), "--tasks", "heldout_cloze,tiny_ppl", "--include-path",
          local_tasks, "--out", str(tmp_path / "ev"), "--batch-size", "2"])
    res = json.loads((tmp_path / "ev" / "lm_eval.json").read_text())
    assert {r["task"] for r in res["rows"]} == {"heldout_cloze", "tiny_ppl"}
    assert "| tiny_ppl | word_perplexity |" in (tmp_path / "ev" / "lm_eval.md").read_text()
    assert "student / teacher" in capsys.readouterr().out


def test_lm_eval_command_line_sees_the_hedgehog_model_type(tiny_run, local_tasks, tmp_path, capsys):
    from hedgehog.cli import main

    out = tmp_path / "le"
    main(["lm-eval", "--model", "hedgehog", "--model_args", f"pretrained={tiny_run / 'model'}", "--tasks",
          "heldout_cloze", "--include_path", local_tasks, "--batch_size", "2", "--output_path", str(out)])
    printed = capsys.readouterr().out
    assert "heldout_cloze" in printed and "acc" in printed
    assert list(out.rglob("results*.json"))


def test_plain_lm_eval_command_finds_the_hedgehog_model_type(tiny_run, local_tasks, tmp_path):
    """`lm_eval --model hedgehog` in a fresh interpreter that never imports hedgehog itself: the start-up hook
    installed with the package (hedgehog-lm-eval.pth) registers the type; its score is the library's."""
    import subprocess
    import sys

    out = tmp_path / "plain"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hedgehog", "--model_args",
                           f"pretrained={tiny_run / 'model'}", "--tasks", "heldout_cloze", "--include_path",
                           local_tasks, "--batch_size", "2", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = list(out.rglob("results*.json"))
    acc = json.loads(path.read_text())["results"]["heldout_cloze"]["acc,none"]
    ours = lmeval.evaluate(str(tiny_run / "model"), ["heldout_cloze"], teacher=False, include_path=local_tasks,
                           batch_size=2)
    assert acc == pytest.approx(ours["heldout_cloze"]["acc,none"])


def test_start_up_hook_is_lazy():
    """At start-up the hook imports neither torch nor hedgehog; lm-eval's model table then lists `hedgehog` as a
    lazy entry, still without importing hedgehog."""
    import subprocess
    import sys

    code = ("import sys\n"
            "print('torch' in sys.modules, 'hedgehog' in sys.modules)\n"
            "import lm_eval.models\n"
            "from lm_eval.api.registry import model_registry\n"
            "print('hedgehog' in model_registry, 'hf' in model_registry, 'hedgehog' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "True", "True", "False"]


def test_metrics_keep_scores_and_drop_bookkeeping():
    res = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 60, "acc_norm,none": 0.75}}
    assert lmeval._metrics(res) == {"t": {"acc": 0.5, "acc_norm": 0.75}}
