"""The one rule that says what a --data value names (loading, the cheap checks and held-out bookkeeping share it)."""
import json

from hedgehog.data.corpora import source_kind, training_sources


def test_source_kind_names_each_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a record"}) + "\n")
    (tmp_path / "folder").mkdir()
    assert source_kind("general") == "general"
    assert source_kind("shakespeare") == "shakespeare"
    assert source_kind("git-docs") == "registry"
    assert source_kind(str(tmp_path / "rows.jsonl")) == "records"
    assert source_kind(str(tmp_path / "notes.txt")) == "files"
    assert source_kind(str(tmp_path / "folder")) == "files"


def test_training_sources_follow_the_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text\n")
    assert training_sources("general") == {"python-docs", "debian-handbook"}
    assert training_sources("git-docs") == {"git-docs"}
    assert training_sources(str(tmp_path / "notes.txt")) == {str((tmp_path / "notes.txt").resolve())}
