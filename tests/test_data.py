"""load_texts: every local format, directories, the char limit, and the errors it must raise."""

import gzip
import json
from pathlib import Path

import pytest

from mha2mla_core.data import is_plain_text, load_texts


def _write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "book.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert load_texts(tmp_path / "book.txt") == ["line one\nline two\n"]


def test_a_file_of_any_other_suffix_is_plain_text_and_binary_is_refused(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" = Valkyria = \n\n text\n", encoding="utf-8")
    assert load_texts(tmp_path / "wiki.test.raw") == [" = Valkyria = \n\n text\n"]
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\xff\xfe" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"model.gguf: not UTF-8 text"):
        load_texts(tmp_path / "model.gguf")


def test_plain_text_is_what_is_not_json_or_parquet():
    assert [is_plain_text(Path(n)) for n in ("a.txt", "wiki.test.raw", "notes", "a.jsonl.gz", "a.json", "a.parquet")] == [
        True, True, True, False, False, False]  # fmt: skip


def test_jsonl_gz_and_custom_field(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl.gz", [{"body": "alpha", "id": 1}, {"body": "beta", "id": 2}], gzip.open)
    assert load_texts(tmp_path / "a.jsonl.gz", text_field="body") == ["alpha", "beta"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert load_texts(tmp_path / "d.parquet") == ["p1", "p2"]


def test_directory_mixes_formats_and_columns_in_sorted_order(tmp_path):
    _write_jsonl(tmp_path / "1.jsonl", [{"text": "j1", "book": "b"}, {"text": "", "book": "b"}, {"text": "j2", "book": "c"}])
    (tmp_path / "2.txt").write_text("t1", encoding="utf-8")
    _write_jsonl(tmp_path / "3.jsonl", [{"text": "j3", "chapter": 7}])
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    assert load_texts(tmp_path) == ["j1", "j2", "t1", "j3"]


def test_limit_chars_cuts_the_last_document(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "abcd"}, {"text": "efgh"}, {"text": "ijkl"}])
    assert load_texts(tmp_path / "a.jsonl", limit_chars=6) == ["abcd", "ef"]


def test_missing_text_field_names_the_fields(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "source": "y"}])
    with pytest.raises(ValueError, match=r"no text field 'text'.*\['content', 'source'\]"):
        load_texts(tmp_path / "a.jsonl")


def test_missing_path_and_empty_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_texts(tmp_path / "nope.jsonl")
    _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="no text found"):
        load_texts(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="limit_chars=0"):
        load_texts(tmp_path / "empty.jsonl", limit_chars=0)
