"""Records and loaders: one schema from every format, and bad input reported by place.

Bad inputs fed below (each must raise an error whose text names the file, the line/row and, for a row-level
problem, the field):

 1. malformed JSON on a JSONL line
 2. a JSONL line that is valid JSON but not an object (a list, a string)
 3. missing ``instruction``
 4. wrongly typed field: ``output`` is a number; ``choices`` is not a list; ``answer`` is a number; ``meta`` is
    not an object; ``id`` is a list or a bool
 5. empty (whitespace-only) ``instruction``
 6. duplicate ``id`` within one file, and across files (``load_many``)
 7. unknown domain (not in ``allowed_domains``), and a domain that is not a lowercase identifier
 8. a row's domain conflicting with the source's declared domain; a row with no domain at all
 9. undecodable bytes (raw ``b'\\xff\\xfe'``) in JSONL, CSV and JSON files
10. ``answer`` neither among the ``choices`` nor a valid letter (also a letter past the last option)
11. empty ``output`` in a training record (allowed when ``require_output=False``)
12. empty ``choices`` list
13. a bad CSV ``choices`` cell (not a JSON list)
14. a malformed ``.json`` file, a ``.json`` file that is not a list, a ``.json`` item that is not an object
15. an unsupported file extension
16. a missing file
17. ``fields`` mapping an unknown schema field, or a column the source lacks
18. a UTF-8 byte-order mark at the start of a CSV (Excel's "CSV UTF-8"), a JSON or a JSONL file: valid, must load
19. a UTF-16 file: refused with a hint to save it as UTF-8
20. a CSV record whose quoted cell spans lines: reported at the line it starts on
21. a source that yields no record: warned about by name

With ``skip_invalid`` bad rows are counted and reported in ``LoadReport.skipped``, good rows kept.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from rega.config import DataSource
from rega.data.loaders import LoadReport, load_many, load_records
from rega.data.records import GENERAL, Record, RecordError, check_unique_ids, record_from_dict
from rega.paths import DEMO_DIR, resolve_path


def row(i: int = 0, **overrides) -> dict:
    base = {
        "id": f"r{i}",
        "instruction": f"Question {i}?",
        "input": f"context {i}",
        "output": f"answer {i}",
        "domain": "medical",
        "task": "qa",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def write_lines(path: Path, lines: list[str | bytes | dict]) -> Path:
    """Write raw JSONL lines: dicts are dumped, str written as is, bytes written raw."""
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode("utf-8")
            handle.write(line + b"\n")
    return path


def mcq(i: int = 0, **overrides) -> dict:
    fields = {"choices": ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"], "answer": "B", "task": "mcq"}
    return row(i, **{**fields, **overrides})


# --------------------------------------------------------------------------------------------- schema


def test_record_from_dict_fills_source_defaults_and_converts_int_ids():
    rec = record_from_dict(
        {"id": 7, "instruction": "Q?", "output": "A."}, "f.jsonl:1", domain="legal", task="t", lang="zh"
    )
    assert (rec.id, rec.domain, rec.task, rec.lang, rec.input) == ("7", "legal", "t", "zh", "")
    assert rec.user_text == "Q?"
    assert rec.origin == "f.jsonl:1"
    # the task defaults to the domain, the language comes from the text (English here), the id from the default
    rec = record_from_dict({"instruction": "Q?", "output": "A."}, "x", domain="legal", default_id="legal-3")
    assert (rec.id, rec.task, rec.lang) == ("legal-3", "legal", "en")


def test_record_roundtrips_through_to_dict_and_resolves_gold_choice():
    raw = mcq(1, category="clinical", meta={"source": "demo"})
    rec = record_from_dict(raw, "f:1")
    assert record_from_dict(rec.to_dict(), "again") == rec
    assert rec.user_text == "Question 1?\n\ncontext 1"
    assert rec.gold_choice() == "Vitamin C"
    assert record_from_dict(mcq(2, answer="Vitamin D"), "f:2").gold_choice() == "Vitamin D"
    assert record_from_dict(row(3), "f:3").gold_choice() is None
    assert "choices" not in record_from_dict(row(3), "f:3").to_dict()


def test_require_output_false_accepts_instruction_pools():
    rec = record_from_dict(
        {"id": "g", "instruction": "Tell me a joke."}, "f:1", domain=GENERAL, require_output=False
    )
    assert rec.output == ""


def test_record_error_carries_place_and_field():
    err = RecordError("data.jsonl:4", "output", "is empty")
    assert str(err) == "data.jsonl:4: field 'output': is empty"
    assert (err.where, err.field, err.problem) == ("data.jsonl:4", "output", "is empty")
    assert str(RecordError("data.jsonl:4", None, "malformed JSON")) == "data.jsonl:4: malformed JSON"


def test_check_unique_ids_names_both_places():
    a = record_from_dict(row(1), "a.jsonl:1")
    b = record_from_dict(row(1), "b.jsonl:9")
    with pytest.raises(
        RecordError, match=r"b\.jsonl:9: field 'id': duplicate id 'r1' \(first seen at a\.jsonl:1\)"
    ):
        check_unique_ids([a, b])


# ------------------------------------------------------------------------------------ bad JSONL rows

# (bad line, field named in the error or None, words the error must contain, load_records kwargs, source kwargs)
BAD_LINES = {
    "malformed_json": ('{"id": "x", "instruction": "Q?", ', None, "malformed JSON", {}, {}),
    "not_an_object_list": ("[1, 2, 3]", None, "expected a JSON object, got list", {}, {}),
    "not_an_object_string": ('"just text"', None, "expected a JSON object, got str", {}, {}),
    "missing_instruction": (row(9, instruction=...), "instruction", "missing", {}, {}),
    "output_is_a_number": (row(9, output=42), "output", "expected a string, got int", {}, {}),
    "choices_not_a_list": (mcq(9, choices="A, B, C"), "choices", "list of strings", {}, {}),
    "choices_not_strings": (mcq(9, choices=[1, 2, 3, 4]), "choices", "list of strings", {}, {}),
    "choices_empty": (row(9, choices=[]), "choices", "non-empty list", {}, {}),
    "answer_is_a_number": (mcq(9, answer=2), "answer", "expected a string, got int", {}, {}),
    "meta_not_an_object": (row(9, meta=[1]), "meta", "expected an object", {}, {}),
    "id_is_a_list": (row(9, id=["a"]), "id", "non-empty string", {}, {}),
    "id_is_a_bool": (row(9, id=True), "id", "non-empty string", {}, {}),
    "id_is_blank": (row(9, id="  "), "id", "non-empty string", {}, {}),
    "empty_instruction": (row(9, instruction="   "), "instruction", "is empty", {}, {}),
    "empty_output": (row(9, output=" \n"), "output", "is empty", {}, {}),
    "missing_output": (row(9, output=...), "output", "missing", {}, {}),
    "duplicate_id_in_file": (row(1), "id", "duplicate id 'r1' (first seen at", {}, {}),
    "unknown_domain": (
        row(9, domain="chemistry"),
        "domain",
        "unknown domain 'chemistry' (configured: finance, legal, medical)",
        {"allowed_domains": frozenset({"medical", "legal", "finance"})},
        {},
    ),
    "domain_not_identifier": (row(9, domain="Medical"), "domain", "not a lowercase identifier", {}, {}),
    "domain_conflicts_with_source": (
        row(9, domain="legal"),
        "domain",
        "is 'legal' but this source is declared as domain 'medical'",
        {},
        {"domain": "medical"},
    ),
    "no_domain_anywhere": (row(9, domain=...), "domain", "missing", {}, {}),
    "answer_not_among_choices": (
        mcq(9, answer="Vitamin B12"),
        "answer",
        "neither one of the choices nor",
        {},
        {},
    ),
    "answer_letter_past_last_option": (mcq(9, answer="E"), "answer", "letter A-D", {}, {}),
    "answer_lowercase_letter": (mcq(9, answer="b"), "answer", "neither one of the choices nor", {}, {}),
    "undecodable_bytes": (
        b'{"id": "x", "instruction": "\xff\xfe"}',
        None,
        "undecodable bytes (not UTF-8)",
        {},
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_row_error_names_file_line_and_field(tmp_path, case):
    bad, field_name, words, load_kwargs, source_kwargs = BAD_LINES[case]
    # line 1 good, line 2 blank (physical line numbers must still count it), line 3 good, line 4 bad, line 5 good
    path = write_lines(tmp_path / "data.jsonl", [row(1), "", mcq(2), bad, row(3)])
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path), **source_kwargs), **load_kwargs)
    err = info.value
    place = f"{path}:4"
    expected_prefix = f"{place}: field '{field_name}': " if field_name else f"{place}: "
    assert str(err).startswith(expected_prefix), str(err)
    assert words in str(err)
    assert err.field == field_name
    assert "\n" not in str(err)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_invalid_reports_every_bad_row_and_keeps_good_ones(tmp_path, case):
    bad, field_name, words, load_kwargs, source_kwargs = BAD_LINES[case]
    path = write_lines(tmp_path / "data.jsonl", [row(1), "", mcq(2), bad, row(3)])
    report = load_records(DataSource(str(path), **source_kwargs), skip_invalid=True, **load_kwargs)
    assert [r.id for r in report.records] == ["r1", "r2", "r3"]
    assert len(report.skipped) == 1
    assert report.skipped[0].startswith(f"{path}:4: ")
    assert words in report.skipped[0]


def test_skip_invalid_counts_many_bad_rows_and_logs_them(tmp_path, caplog):
    lines = [row(1), row(2, output=5), "{oops", row(3), row(3), row(4, instruction=""), row(5)]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="rega.data.loaders"):
        report = load_records(DataSource(str(path)), skip_invalid=True)
    assert [r.id for r in report.records] == ["r1", "r3", "r5"]
    assert [s.split(": ", 1)[0] for s in report.skipped] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "field 'output'" in report.skipped[0]
    assert "malformed JSON" in report.skipped[1]
    assert "duplicate id 'r3'" in report.skipped[2]
    assert "field 'instruction'" in report.skipped[3]
    assert "skipped 4 invalid rows" in caplog.text


def test_without_skip_invalid_the_first_bad_row_stops_loading(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [row(1), row(2, output=5), "{oops"])
    with pytest.raises(RecordError, match=r"mixed\.jsonl:2: field 'output'"):
        load_records(DataSource(str(path)))


def test_duplicate_id_across_files_names_both_files(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [row(1), row(2)])
    b = write_lines(tmp_path / "b.jsonl", [row(3), row(2)])
    with pytest.raises(RecordError) as info:
        load_many([DataSource(str(a)), DataSource(str(b))])
    assert str(info.value).startswith(f"{b}:2: field 'id': duplicate id 'r2'")
    assert f"first seen at {a}:2" in str(info.value)


def test_load_many_merges_records_and_skipped_rows(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [row(1), row(2, output="")])
    b = write_lines(tmp_path / "b.jsonl", [row(3, domain="legal"), "[]"])
    report = load_many([DataSource(str(a)), DataSource(str(b))], skip_invalid=True)
    assert isinstance(report, LoadReport)
    assert [(r.id, r.domain) for r in report.records] == [("r1", "medical"), ("r3", "legal")]
    assert [s.split(": ", 1)[0] for s in report.skipped] == [f"{a}:2", f"{b}:2"]


def test_limit_keeps_first_valid_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(1), row(2, output=""), row(3), row(4)])
    report = load_records(DataSource(str(path), limit=2), skip_invalid=True)
    assert [r.id for r in report.records] == ["r1", "r3"]


# ------------------------------------------------------------------------------- other bad inputs


def test_bad_csv_choices_cell_names_line_and_field(tmp_path):
    path = tmp_path / "mcq.csv"
    path.write_text(
        "id,instruction,output,domain,choices,answer\n"
        'a,Q1?,B,medical,"[""yes"", ""no""]",no\n'
        'b,Q2?,B,medical,"[yes, no",no\n',
        encoding="utf-8",
    )
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert str(info.value).startswith(f"{path}:3: field 'choices': ")


def test_undecodable_csv_error_names_the_line(tmp_path):
    """The error must point at the bad line, not a byte offset inside the csv module's read buffer."""
    header = b"id,instruction,output,domain\n"
    good = b"".join(
        b"r%d,Question %d with some padding to grow the file past one buffer,answer,medical\n" % (i, i)
        for i in range(300)
    )
    path = tmp_path / "big.csv"
    path.write_bytes(header + good + b"bad,\xff\xfe,answer,medical\n")
    bad_line = 2 + 300
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert "undecodable bytes" in str(info.value)
    assert str(info.value).startswith(f"{path}:{bad_line}"), str(info.value)


def test_undecodable_json_error_names_the_line(tmp_path):
    path = tmp_path / "big.json"
    items = b'{"instruction": "q", "output": "o", "domain": "medical"},\n' * 50
    path.write_bytes(b"[\n" + items + b'{"instruction": "\xff", "output": "o", "domain": "medical"}]\n')
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert "undecodable bytes" in str(info.value)
    assert str(info.value).startswith(f"{path}:52"), str(info.value)


def test_csv_with_utf8_byte_order_mark_loads(tmp_path):
    """Excel writes "CSV UTF-8" with a BOM; the first header must still be recognised (not '\\ufeffid')."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,output,domain\nWhat is X?,It is X.,medical\n")
    report = load_records(DataSource(str(path)))
    assert [r.instruction for r in report.records] == ["What is X?"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_byte_order_mark_is_accepted_in_every_text_format(tmp_path, suffix):
    """Windows editors write a BOM; JSONL used to reject it while JSON and CSV accepted it."""
    item = {"instruction": "What is X?", "output": "It is X.", "domain": "medical"}
    text = {
        ".jsonl": json.dumps(item) + "\n",
        ".json": json.dumps([item]),
        ".csv": "instruction,output,domain\nWhat is X?,It is X.,medical\n",
    }[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [r.instruction for r in load_records(DataSource(str(path))).records] == ["What is X?"]


def test_utf16_file_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(json.dumps(row()).encode("utf-16"))
    with pytest.raises(RecordError, match="UTF-16 byte-order mark: save it as UTF-8") as info:
        load_records(DataSource(str(path)))
    assert str(info.value).startswith(f"{path}:1: undecodable bytes")


@pytest.mark.parametrize(
    ("end", "expected"),
    [("\n", "at column 31: Invalid control character"), ("", "at column 28: Unterminated string starting")],
)
def test_malformed_json_message_says_at_once(tmp_path, end, expected):
    """json's messages ending in "at" used to become "... starting at at column 28"."""
    path = tmp_path / "cut.jsonl"
    path.write_text('{"id": "x", "instruction": "Q?' + end, encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert str(info.value) == f"{path}:1: malformed JSON {expected}"


def test_csv_record_spanning_lines_is_reported_at_its_first_line(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text(
        'id,instruction,output,domain\n\na,"a question\non two lines",fine,medical\n'
        'b,"another\nlong\nquestion",,medical\nc,q,ok,medical\n',
        encoding="utf-8",
    )
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert str(info.value).startswith(f"{path}:5: field 'output'"), str(info.value)  # record b: lines 5-7
    report = load_records(DataSource(str(path)), skip_invalid=True)
    assert [r.origin for r in report.records] == [f"{path}:3", f"{path}:8"]


@pytest.mark.parametrize("case", ["empty", "all_invalid"])
def test_source_without_records_is_warned_about_by_name(tmp_path, caplog, case):
    path = tmp_path / f"{case}.jsonl"
    path.write_text("" if case == "empty" else '{"id": 1}\n{"id": 2}\n', encoding="utf-8")
    report = load_records(DataSource(str(path), domain="medical"), skip_invalid=True)
    why = "holds no records" if case == "empty" else "all 2 rows invalid and skipped (first: "
    assert report.records == [] and len(report.empty) == 1 and why in report.empty[0]
    assert f"empty source: {path}" in caplog.text


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n  {"instruction": "Q?", "output": "A", "domain": "medical"},\n  {"instruction": \n]\n'
    )
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert str(info.value).startswith(f"{path}:4: malformed JSON")


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"rows": []}')
    with pytest.raises(RecordError, match=r"obj\.json: expected a JSON list of objects"):
        load_records(DataSource(str(path)))


def test_json_item_that_is_not_an_object_names_item(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps([row(0), "text", row(2)]))
    with pytest.raises(RecordError) as info:
        load_records(DataSource(str(path)))
    assert str(info.value).startswith(f"{path}:item 1: expected a JSON object")


def test_unsupported_extension_names_file_and_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"data\.txt: unsupported file type '\.txt'"):
        load_records(DataSource(str(path)))


def test_missing_file_names_source_and_resolved_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        load_records(DataSource(str(missing)))
    assert str(missing) in str(info.value)


def test_fields_mapping_unknown_schema_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(1)])
    with pytest.raises(ValueError, match="unknown schema field 'question'"):
        load_records(DataSource(str(path), fields={"question": "instruction"}))


def test_fields_mapping_to_absent_column_is_reported_as_missing(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"q": "Q?", "a": "A."}])
    with pytest.raises(RecordError, match=r"d\.jsonl:1: field 'instruction': missing"):
        load_records(
            DataSource(str(path), domain="medical", fields={"instruction": "question", "output": "a"})
        )


# ------------------------------------------------------------------------------------------ formats

ROWS = [
    row(0),
    mcq(1),
    mcq(2, answer="Vitamin D", input=..., category="clinical"),
    row(3, domain="legal", task="yesno", choices=["Yes", "No"], answer="No", lang="en"),
]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    write_lines(path.with_suffix(".jsonl"), rows)
    return str(path.with_suffix(".jsonl"))


def _write_json_list(path: Path, rows: list[dict]) -> str:
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return str(path.with_suffix(".json"))


def _write_json_data(path: Path, rows: list[dict]) -> str:
    path.with_suffix(".json").write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
    return str(path.with_suffix(".json"))


def _write_csv(path: Path, rows: list[dict]) -> str:
    columns = [
        "id",
        "instruction",
        "input",
        "output",
        "domain",
        "task",
        "lang",
        "choices",
        "answer",
        "category",
    ]
    out = path.with_suffix(".csv")
    with open(out, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            cells = {k: r.get(k, "") for k in columns}
            if "choices" in r:
                cells["choices"] = json.dumps(r["choices"])  # a list is a JSON cell in CSV
            writer.writerow(cells)
    return str(out)


def _columnar(rows: list[dict]) -> list[dict]:
    """Every row with every column (None where absent): Arrow infers the schema from the first row only."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in columns} for r in rows]


def _write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(_columnar(rows)), out)
    return str(out)


def _write_datasets(path: Path, rows: list[dict]) -> str:
    import datasets

    out = path.parent / "saved_dataset"
    datasets.Dataset.from_list(_columnar(rows)).save_to_disk(str(out))
    return str(out)


def _write_datasets_dict(path: Path, rows: list[dict]) -> str:
    import datasets

    out = path.parent / "saved_dataset_dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_columnar(rows)),
            "validation": datasets.Dataset.from_list(_columnar(rows)[:1]),
        }
    ).save_to_disk(str(out))
    return str(out)


WRITERS = {
    "jsonl": _write_jsonl,
    "json_list": _write_json_list,
    "json_data": _write_json_data,
    "csv": _write_csv,
    "parquet": _write_parquet,
    "datasets_folder": _write_datasets,
    "datasets_dict_folder": _write_datasets_dict,
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_yields_the_same_records(tmp_path, fmt):
    expected = [record_from_dict(r, "expected").to_dict() for r in ROWS]
    source = WRITERS[fmt](tmp_path / "data", ROWS)
    report = load_records(DataSource(source))
    assert [r.to_dict() for r in report.records] == expected
    assert report.skipped == []
    assert all(r.origin.startswith(str(resolve_path(source))) for r in report.records)


@pytest.mark.parametrize("fmt", ["parquet", "datasets_folder", "csv", "json_list"])
def test_every_format_reports_bad_rows_by_place(tmp_path, fmt):
    rows = [row(0), row(1, output="  "), row(2)]
    source = WRITERS[fmt](tmp_path / "data", rows)
    with pytest.raises(RecordError) as info:
        load_records(DataSource(source))
    where = {"parquet": "row 1", "datasets_folder": "row 1", "csv": "3", "json_list": "item 1"}[fmt]
    assert str(info.value).startswith(f"{resolve_path(source)}:{where}: field 'output'"), str(info.value)
    report = load_records(DataSource(source), skip_invalid=True)
    assert [r.id for r in report.records] == ["r0", "r2"] and len(report.skipped) == 1


def test_csv_empty_cells_are_absent_and_choices_cell_is_parsed(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,input,output,choices,answer\nPick one.,,Yes,"[""Yes"", ""No""]",Yes\n', encoding="utf-8"
    )
    (rec,) = load_records(DataSource(str(path), domain="legal", task="yesno")).records
    assert (rec.input, rec.choices, rec.answer, rec.domain, rec.task) == (
        "",
        ("Yes", "No"),
        "Yes",
        "legal",
        "yesno",
    )
    assert rec.id == "yesno-0"


def test_field_mapping_pubmedqa_style_columns(tmp_path):
    """Columns as in the Hugging Face PubMedQA release (pubid, question, context, final_decision)."""
    rows = [
        {
            "pubid": 21645374,
            "question": "Do mitochondria play a role?",
            "context": "Abstract one.",
            "long_answer": "Yes, they do.",
            "final_decision": "yes",
        },
        {
            "pubid": 16418930,
            "question": "Is X better than Y?",
            "context": "Abstract two.",
            "long_answer": "Unclear.",
            "final_decision": "maybe",
        },
    ]
    path = _write_parquet(tmp_path / "pubmedqa", rows)
    source = DataSource(
        path,
        domain="medical",
        task="pubmedqa",
        fields={"id": "pubid", "instruction": "question", "input": "context", "output": "final_decision"},
    )
    records = load_records(source).records
    assert [(r.id, r.instruction, r.input, r.output, r.domain, r.task) for r in records] == [
        ("21645374", "Do mitochondria play a role?", "Abstract one.", "yes", "medical", "pubmedqa"),
        ("16418930", "Is X better than Y?", "Abstract two.", "maybe", "medical", "pubmedqa"),
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "datasets_folder"])
def test_field_mapping_alpaca_style_columns(tmp_path, fmt):
    """Alpaca-like pools with other column names (Dolly: instruction/context/response) and no ids."""
    rows = [
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
        {
            "instruction": "Summarise.",
            "context": "A long text.",
            "response": "Short.",
            "category": "summarization",
        },
    ]
    source = WRITERS[fmt](tmp_path / "dolly", rows)
    records = load_records(
        DataSource(source, domain=GENERAL, task="dolly", fields={"input": "context", "output": "response"})
    ).records
    assert [(r.id, r.user_text, r.output, r.category, r.task) for r in records] == [
        ("dolly-0", "Name a colour.", "Blue.", "open_qa", "dolly"),
        ("dolly-1", "Summarise.\n\nA long text.", "Short.", "summarization", "dolly"),
    ]


def test_datasets_dict_folder_honours_split(tmp_path):
    source = _write_datasets_dict(tmp_path / "x", ROWS)
    assert [r.id for r in load_records(DataSource(source, split="validation")).records] == ["r0"]


# -------------------------------------------------------------------------------------- path prefixes


def test_shared_prefix_resolves_against_env(tmp_path, monkeypatch):
    monkeypatch.setenv("REGA_SHARED_DATA", str(tmp_path))
    (tmp_path / "toy").mkdir()
    write_lines(tmp_path / "toy" / "train.jsonl", [row(1), row(2)])
    assert resolve_path("shared:toy/train.jsonl") == tmp_path / "toy" / "train.jsonl"
    report = load_records(DataSource("shared:toy/train.jsonl"))
    assert [r.id for r in report.records] == ["r1", "r2"]
    assert report.records[0].origin == f"{tmp_path / 'toy' / 'train.jsonl'}:1"


def test_demo_prefix_and_plain_paths():
    assert resolve_path("demo:medical.jsonl") == DEMO_DIR / "medical.jsonl"
    assert resolve_path("~/x.jsonl") == Path.home() / "x.jsonl"
    assert resolve_path("rel/x.jsonl") == Path("rel/x.jsonl")
    records = load_records(DataSource("demo:medical.jsonl", domain="medical")).records
    assert len(records) == 40 and {r.domain for r in records} == {"medical"}
    assert {r.task for r in records} == {"demo_med_mcq", "demo_med_qa"}
    assert all(r.gold_choice() in r.choices for r in records if r.choices)


def test_missing_shared_file_names_the_prefixed_source(tmp_path, monkeypatch):
    monkeypatch.setenv("REGA_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'shared:none/train\.jsonl' not found \(resolved to "):
        load_records(DataSource("shared:none/train.jsonl"))


def test_record_is_immutable():
    rec = Record(id="a", instruction="i", input="", output="o", domain="medical", task="t")
    with pytest.raises(AttributeError):
        rec.output = "changed"  # type: ignore[misc]
