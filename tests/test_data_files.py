"""tensornet.finetune.tasks.load_data_file: JSON, JSON Lines, CSV and Parquet via datasets.

Real files of each format are written in ``tmp_path`` (Parquet by pyarrow) and read back;
the reference is the list of Examples written, and :func:`load_jsonl` for JSON Lines.
Every bad input must give a one-line DataError naming the file and the problem.
"""

from __future__ import annotations

import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tensornet.finetune import DataError as ExportedDataError
from tensornet.finetune.tasks import (
    DATA_SUFFIXES,
    DataError,
    Example,
    load_data_file,
    load_jsonl,
    split_examples,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": "Ava has 3 apples. How many now?", "response": "3 + 4 = 7.\n#### 7"},
    {"prompt": "Quote \"this\", and a comma", "response": "007"},
    {"prompt": "Ünïcode ✓", "response": "no number here"},
]
EXPECTED = [Example("Ava has 3 apples. How many now?", "3 + 4 = 7.\n#### 7", "7"),
            Example('Quote "this", and a comma', "007", "7"),
            Example("Ünïcode ✓", "no number here", None)]


def _jsonl(path, rows, *, blank_lines=False):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    text = ("\n\n   \n" if blank_lines else "\n").join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _csv(path, rows, fields=("prompt", "response")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*fields, "extra"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "extra": "1"})
    return path


def _parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def _one_line_error(path, *needles, **kw):
    with pytest.raises(DataError) as info:
        load_data_file(path, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --------------------------------------------------------------------------- formats


def test_jsonl_with_blank_lines_matches_load_jsonl(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS, blank_lines=True)
    assert load_data_file(path) == EXPECTED == load_jsonl(path)


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    assert load_data_file(path) == EXPECTED


def test_json_lines_in_a_json_file(tmp_path):
    path = _jsonl(tmp_path / "data.json", ROWS)
    assert load_data_file(path) == EXPECTED


def test_csv_cells_are_read_as_written(tmp_path):
    # "007" stays a string (no type inference), quotes/commas/newlines survive
    path = _csv(tmp_path / "data.csv", ROWS)
    assert load_data_file(path) == EXPECTED


def test_parquet(tmp_path):
    path = _parquet(tmp_path / "data.parquet", _columns(ROWS))
    assert load_data_file(path) == EXPECTED


def test_other_field_names_and_upper_case_suffix(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["response"], "id": i}
            for i, r in enumerate(ROWS)]
    path = _parquet(tmp_path / "DATA.PARQUET", _columns(rows))
    assert load_data_file(path, prompt_field="question", response_field="answer") == EXPECTED
    renamed = [{"question": r["prompt"], "answer": r["response"]} for r in ROWS]
    path = _csv(tmp_path / "data.csv", renamed, fields=("question", "answer"))
    assert load_data_file(path, prompt_field="question", response_field="answer") == EXPECTED


def test_duplicates_are_kept_until_split(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [*ROWS, ROWS[0]])
    examples = load_data_file(path)
    assert len(examples) == 4
    splits = split_examples(examples, validation=1, test=1)
    assert sum(splits.sizes().values()) == 3


def test_reading_needs_no_network_and_writes_nothing_here(tmp_path, monkeypatch):
    path = _csv(tmp_path / "data.csv", ROWS)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load_data_file(path) == EXPECTED
    assert list(here.iterdir()) == []


def test_the_suffixes_and_the_exported_error():
    assert sorted(DATA_SUFFIXES) == [".csv", ".json", ".jsonl", ".parquet"]
    assert ExportedDataError is DataError
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.jsonl", "nope.jsonl", "does not exist")
    _one_line_error(tmp_path, str(tmp_path), "folder")


def test_unknown_suffix_lists_the_valid_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("prompt,response\na,b\n")
    _one_line_error(path, "data.txt", "'.txt'", ".csv", ".json", ".jsonl", ".parquet")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_field_names_it_and_lists_the_columns(fmt, tmp_path):
    rows = [{"question": "q", "response": "r"}]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        _jsonl(path, rows)
    elif fmt == "csv":
        _csv(path, rows, fields=("question", "response"))
    else:
        _parquet(path, _columns(rows))
    _one_line_error(path, path.name, "'prompt'", "'question'", "'response'",
                    "--prompt-field", "--response-field")


@pytest.mark.parametrize(("rows", "needles"), [
    ([ROWS[0], {"prompt": "p", "response": 5}], ["row 2", "'response'", "int 5"]),
    ([{"prompt": ["a"], "response": "r"}], ["row 1", "'prompt'", "list"]),
    ([ROWS[0], ROWS[1], {"prompt": "p", "response": "   "}], ["row 3", "empty"]),
    ([ROWS[0], {"prompt": "p"}], ["row 2", "'response'", "None"]),
    ([{"prompt": None, "response": "r"}], ["row 1", "'prompt'", "None"]),
])
def test_bad_values_name_the_row(rows, needles, tmp_path):
    _one_line_error(_jsonl(tmp_path / "data.jsonl", rows), "data.jsonl", *needles)


def test_empty_csv_cell_names_the_row(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\na,b\nc,\n", encoding="utf-8")
    _one_line_error(path, "data.csv", "row 2", "'response'", "empty")


def test_non_string_parquet_column_names_the_row(tmp_path):
    path = _parquet(tmp_path / "data.parquet", {"prompt": ["a", "b"], "response": [1, 2]})
    _one_line_error(path, "data.parquet", "row 1", "'response'", "int 1")


@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("empty.csv", ""),
    ("empty.json", "[]"), ("header.csv", "prompt,response\n"),
])
def test_empty_file(name, content, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    _one_line_error(path, name, "no examples")


def test_empty_parquet(tmp_path):
    path = _parquet(tmp_path / "empty.parquet",
                    {"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())})
    _one_line_error(path, "empty.parquet", "no examples")


@pytest.mark.parametrize(("name", "content"), [
    ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n'),
    ("bad.parquet", "this is not parquet"),
])
def test_unparsable_file(name, content, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    _one_line_error(path, name, "cannot be read as")


def test_csv_rows_with_more_cells_than_the_header_are_refused(tmp_path):
    # pandas took the extra first cell of every row as an index: the columns were read
    # shifted (the prompt as the response) and trained on
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\nx,What is 1+1?,2\ny,What is 2+2?,4\n")
    with pytest.raises(DataError, match=r"row 1.*3 cells.*header.*2"):
        load_data_file(path)


def test_the_same_field_for_prompt_and_response_is_refused(tmp_path):
    path = _csv(tmp_path / "data.csv", ROWS)
    with pytest.raises(DataError, match="`prompt_field` and `response_field`.*'prompt'"):
        load_data_file(path, prompt_field="prompt", response_field="prompt")
