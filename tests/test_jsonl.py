"""pipeline/jsonl.py: validation errors name file, line and field; atomic writes; torn-line recovery."""

import json
import os

import pytest

from pipeline.errors import InputError, UserError
from pipeline.jsonl import (INSTRUCTION_FIELDS, MAX_RECORD_BYTES, AppendLog, atomic_write, check_output_path,
                            load_records, read_records, write_json_atomic, write_jsonl_atomic)


def write_lines(path, lines, encoding="utf-8"):
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def test_bad_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['{"instruction": "a"}', '{"instruction": "b"}', '{"instruction": oops'])
    with pytest.raises(InputError) as e:
        load_records(path, INSTRUCTION_FIELDS)
    assert f"{path}:3:" in str(e.value)
    assert "not valid JSON" in str(e.value)


@pytest.mark.parametrize("record, field, problem", [
    ({"input": "x"}, "instruction", "missing"),
    ({"instruction": "   "}, "instruction", "empty"),
    ({"instruction": 7}, "instruction", "expected a string"),
    ({"instruction": "ok", "input": ["a"]}, "input", "expected a string"),
    ({"instruction": "ok", "id": True}, "id", "expected a string or an integer"),
])
def test_field_errors_name_the_field(tmp_path, record, field, problem):
    path = write_lines(tmp_path / "x.jsonl", ['{"instruction": "fine"}', json.dumps(record)])
    with pytest.raises(InputError) as e:
        load_records(path, INSTRUCTION_FIELDS)
    assert str(e.value).startswith(f"{path}:2: {field}: {problem}")


def test_not_an_object(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['["a list"]'])
    with pytest.raises(InputError, match=r"x.jsonl:1: expected a JSON object"):
        load_records(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"instruction": "ok"}\n{"instruction": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: invalid UTF-8"):
        load_records(path, INSTRUCTION_FIELDS)


def test_bom_and_blank_lines_are_tolerated(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes('\ufeff{"instruction": "要約して"}\n\n   \n{"instruction": "b"}\n'.encode("utf-8"))
    assert [(n, r["instruction"]) for n, r in read_records(path, INSTRUCTION_FIELDS)] == [(1, "要約して"), (4, "b")]


def test_oversized_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "x" * (MAX_RECORD_BYTES + 10)}) + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:1: line is .* bytes"):
        load_records(path, INSTRUCTION_FIELDS)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    assert load_records(tmp_path / "empty.jsonl", allow_empty=True) == []
    with pytest.raises(UserError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


def test_atomic_write_crash_keeps_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    before = path.read_bytes()

    def records():
        yield {"a": 2}
        raise RuntimeError("crash in the middle of writing")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, records())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_atomic_write_keeps_ordinary_permissions(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    path.chmod(0o640)
    write_jsonl_atomic(path, [{"a": 2}])
    assert path.stat().st_mode & 0o777 == 0o640


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": "日本語"})
    assert json.loads(path.read_text("utf-8")) == {"x": "日本語"}
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"


def test_append_log_recovers_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog(path) as log:
        log.write({"id": 1})
        log.write({"id": 2})
    with open(path, "ab") as f:
        f.write(b'{"id": 3, "instr')  # killed mid-write
    warnings = []
    with AppendLog(path, warn=warnings.append) as log:
        assert [r["id"] for r in log.records] == [1, 2]
        assert log.torn_bytes == len(b'{"id": 3, "instr')
        log.write({"id": 3})
    assert len(warnings) == 1 and "cut off" in warnings[0]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_append_log_recovers_torn_line_with_newline(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "x\n')
    with AppendLog(path, warn=lambda m: None) as log:
        assert [r["id"] for r in log.records] == [1]
    assert path.read_text() == '{"id": 1}\n'


def test_append_log_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(InputError, match=r"log.jsonl:2"):
        AppendLog(path)
    assert path.read_text() == '{"id": 1}\nnot json\n{"id": 3}\n'  # nothing cut


def test_append_log_flushes_each_record(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendLog(path)
    log.write({"id": "a"})
    # Another reader sees the record before close: a kill -9 now would keep it.
    assert json.loads(path.read_text()) == {"id": "a"}
    log.close()


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "ok.jsonl", "--out") == tmp_path / "ok.jsonl"
    with pytest.raises(UserError, match=r"--out .*does not exist"):
        check_output_path(tmp_path / "missing" / "x.jsonl", "--out")
    with pytest.raises(UserError, match=r"--out .*is a folder"):
        check_output_path(tmp_path, "--out")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--out"):
        check_output_path(blocker / "x.jsonl", "--out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="permission denied"):
            check_output_path(locked / "x.jsonl", "--out")
