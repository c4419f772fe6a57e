"""Record data through `datasets`: plain, Alpaca and chat records, every file type, the held-out rule, laziness,
field errors, and conversions end to end on the tiny model."""
import json

import pytest
from conftest import WORDS, user_error

from hedgehog.data.corpora import load_corpus, shuffled_documents
from hedgehog.data.records import HELD_OUT_RULE, RenderedSplit, split_indices


def sentences(n, seed=0, words=30):
    import random

    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(words)) for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_split_rule_is_disjoint_and_covers_every_record():
    idx = split_indices(100)
    assert idx["validation"] == [18, 38, 58, 78, 98] and idx["test"] == [19, 39, 59, 79, 99]
    assert sorted(idx["train"] + idx["validation"] + idx["test"]) == list(range(100))
    tiny = split_indices(3)
    assert all(tiny[s] for s in tiny) and sorted(sum(tiny.values(), [])) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow", "saved"])
def test_every_file_type_gives_the_same_documents(kind, tmp_path):
    import datasets

    texts = sentences(40)
    ds = datasets.Dataset.from_dict({"body": texts, "id": list(range(40))})
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        ds.to_json(str(path), lines=True)
    elif kind == "json":
        path.write_text(json.dumps([{"body": t, "id": i} for i, t in enumerate(texts)]))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "arrow":
        path = tmp_path / "data.arrow"
        ds.save_to_disk(str(tmp_path / "tmp_saved"))
        path = next((tmp_path / "tmp_saved").glob("*.arrow"))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    c = load_corpus(str(path), text_field="body")
    idx = split_indices(40)
    for split in ("train", "validation", "test"):
        assert list(c.splits[split]) == [texts[i] for i in idx[split]]
    assert HELD_OUT_RULE in c.rule and c.documents["test"] == ["2 plain records"]


def test_alpaca_and_chat_records_render_through_the_chat_template_or_the_fallback(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["model"])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "name the king", "input": "", "output": "the lord"},
                                                     {"instruction": "say", "input": "thou art", "output": "fair"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "the queen"},
                                                               {"role": "assistant", "content": "sweet love"}]}] * 3)
    a = load_corpus(alpaca, tok)
    docs = list(a.splits["train"]) + list(a.splits["test"]) + list(a.splits["validation"])
    assert "### Instruction:\nname the king\n\n### Response:\nthe lord" in docs
    assert "### Instruction:\nsay\n\n### Input:\nthou art\n\n### Response:\nfair" in docs
    assert a.rule.startswith("instruction records")
    assert load_corpus(chat, tok).splits["train"][0] == "user: the queen\nassistant: sweet love"
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}")
    assert load_corpus(chat, tok).splits["train"][0] == "<|user|>the queen<|end|><|assistant|>sweet love<|end|>"
    rendered = load_corpus(alpaca, tok).splits["train"][0]
    assert rendered == "<|user|>name the king<|end|><|assistant|>the lord<|end|>"


def test_records_are_rendered_only_when_read(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in sentences(200)])
    c = load_corpus(path)
    reads = []
    train = c.splits["train"]
    assert isinstance(train, RenderedSplit)
    real = train.render
    train.render = lambda r: reads.append(1) or real(r)
    view = shuffled_documents(train, seed=0)
    assert len(view) == len(train) and not reads  # shuffling reads nothing
    first = [view[i] for i in range(3)]
    assert len(reads) == 3 and all(isinstance(t, str) and t for t in first)


def test_fields_that_do_not_fit_are_named(capsys, tiny_assets, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": t, "lang": "en"} for t in sentences(30)])
    base = ["convert", "--model", tiny_assets["model"], "--eval-data", tiny_assets["heldout"], "--out",
            str(tmp_path / "o"), "--seq-len", "16", "--no-progress"]
    err = user_error(capsys, [*base, "--data", path])
    assert "has the fields ['body', 'lang']" in err and "--text-field" in err
    err = user_error(capsys, [*base, "--data", path, "--text-field", "content"])
    assert "plain records need ['content']" in err
    err = user_error(capsys, [*base, "--data", path, "--data-format", "chat"])
    assert "chat records need ['messages']" in err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    assert "cannot read" in user_error(capsys, [*base, "--data", str(broken)])


def test_missing_datasets_package_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from hedgehog.data.records import load_records
    from hedgehog.errors import UserError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name)) if name == "datasets"
                        else real(name, *a, **kw))
    with pytest.raises(UserError, match=r"pip install 'hedgehog\[data\]'"):
        load_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}]))


@pytest.mark.parametrize("kind", ["text-field", "alpaca"])
def test_convert_end_to_end_on_records(kind, tiny_assets, tmp_path):
    from hedgehog.cli import main

    texts = sentences(120, seed=3)
    if kind == "text-field":
        data = write_jsonl(tmp_path / "my.jsonl", [{"content": t} for t in texts])
        extra = ["--text-field", "content"]
    else:
        data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": t[:40], "input": "", "output": t[40:]}
                                                       for t in texts])
        extra = []
    out = tmp_path / "run"
    assert main(["convert", "--model", tiny_assets["model"], "--data", data, *extra, "--eval-data",
                 tiny_assets["heldout"], "--out", str(out), "--seq-len", "32", "--stage1-tokens", "128",
                 "--stage2-tokens", "64", "--eval-tokens", "64", "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert HELD_OUT_RULE in r["held_out_rule"] and r["stage2"]["tokens"] == 64
    name = "my.jsonl" if kind == "text-field" else "alpaca.jsonl"
    assert f"{name} (test split)" in r["fidelity"]["final"]
    assert r["settings"]["text_field"] == ("content" if kind == "text-field" else None)


def test_train_and_eval_read_records(tiny_assets, tiny_run, tmp_path, capsys):
    from hedgehog.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": t[:60]},
                                                               {"role": "assistant", "content": t[60:]}]}
                                                 for t in sentences(80, seed=5)])
    main(["train", "--attention", "softmax", "--data", data, "--out", str(tmp_path / "t"), "--tokens", "512",
          "--seq-len", "32", "--batch-size", "4", "--d-model", "16", "--layers", "1", "--heads", "2",
          "--eval-points", "1", "--val-tokens", "64", "--test-tokens", "64", "--no-progress"])
    rep = json.loads((tmp_path / "t" / "report.json").read_text())
    assert rep["settings"]["data"] == data and rep["test_ppl"] > 1
    main(["eval", "--model", str(tiny_run / "model"), "--data", data, "--eval-data", tiny_assets["heldout"],
          "--seq-len", "16", "--tokens", "64", "--fidelity-tokens", "64", "--no-progress"])
    assert "chat.jsonl (test)" in capsys.readouterr().out


def test_a_hub_dataset_id_is_tried_and_fails_clearly_offline(monkeypatch):
    from hedgehog.data.records import is_hub_id, is_record_source, load_records
    from hedgehog.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert is_hub_id("yahma/alpaca-cleaned") and is_record_source("yahma/alpaca-cleaned")
    assert not is_hub_id("./data/x.txt") and not is_hub_id("a/b/c")
    with pytest.raises(UserError, match="hub dataset"):
        load_records("nobody-here/no-such-dataset")
