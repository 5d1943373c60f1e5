"""pipeline/convert.py: task datasets (CSV, JSONL) and dialogue logs -> instruction records."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline import convert, convert_phrasings
from pipeline.convert import Config, convert_rows
from pipeline.errors import UserError
from pipeline.jsonl import load_records

ROOT = Path(__file__).resolve().parents[1]

# Per kind: rows in English and Japanese, the column names, and what each record must become.
ROWS = {
    "qa": [
        {"context": "Paris is the capital of France.", "question": "What is the capital of France?", "answers": "Paris"},
        {"context": "富士山は日本で一番高い山です。", "question": "日本で一番高い山は何ですか？", "answers": "富士山"},
    ],
    "translation": [
        {"source": "Good morning.", "target": "おはようございます。"},
        {"source": "ありがとうございます。", "target": "Thank you."},
    ],
    "classification": [
        {"text": "I loved this film.", "label": "positive"},
        {"text": "この映画はつまらなかった。", "label": "negative"},
    ],
    "summarization": [
        {"document": "The council met on Monday. It voted to build a new library next year.",
         "summary": "The council voted for a new library."},
        {"document": "市議会は月曜日に開かれ、来年新しい図書館を建てることを決めた。", "summary": "市議会が新図書館の建設を決定。"},
    ],
    "dialogue": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "元気ですか？"}, {"role": "assistant", "content": "元気です。"}]},
    ],
}
OUTPUTS = {
    "qa": ["Paris", "富士山"],
    "translation": ["おはようございます。", "Thank you."],
    "classification": ["positive", "negative"],
    "summarization": ["The council voted for a new library.", "市議会が新図書館の建設を決定。"],
}


def write_rows(path: Path, rows: list[dict]) -> Path:
    """JSONL or CSV by suffix; in a CSV, a list or object cell is written as JSON."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                             for k, v in row.items()})
    return path


def run_convert(tmp_path, kind, rows, suffix=".jsonl", **flags):
    src = write_rows(tmp_path / f"in_{kind}{suffix}", rows)
    out = tmp_path / f"out_{kind}.jsonl"
    stats = convert.run(Config(kind=kind, in_path=str(src), out=str(out), **flags))
    return load_records(out), stats


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("kind", convert.KINDS)
def test_each_kind_converts_english_and_japanese(tmp_path, kind, suffix):
    records, stats = run_convert(tmp_path, kind, ROWS[kind], suffix)
    assert (stats.rows_read, stats.converted, sum(stats.skipped.values())) == (2, 2, 0)
    assert [r["language"] for r in records] == ["en", "ja"]
    assert [r["source_row"] for r in records] == [1, 2]
    assert all(r["source"] == f"in_{kind}{suffix}" and r["kind"] == kind for r in records)
    if kind == "dialogue":
        assert [r["messages"] for r in records] == [row["messages"] for row in ROWS[kind]]
        return
    assert [r["output"] for r in records] == OUTPUTS[kind]
    for record in records:
        # The instruction is one of the phrasings, in the record's own language.
        phrasings = convert_phrasings.INSTRUCTIONS[kind][record["language"]]
        prefixes = [p.split("{")[0] for p in phrasings]
        assert any(record["instruction"].startswith(prefix) for prefix in prefixes), record["instruction"]
        assert ("。" in record["instruction"] or "？" in record["instruction"]) == (record["language"] == "ja")
    if kind == "qa":
        assert records[1]["input"] == "富士山は日本で一番高い山です。\n\n質問: 日本で一番高い山は何ですか？"
    if kind == "translation":
        assert "English" in records[0]["instruction"] and "Japanese" in records[0]["instruction"]
        assert "日本語" in records[1]["instruction"] and "英語" in records[1]["instruction"]
        assert (records[1]["source_lang"], records[1]["target_lang"]) == ("ja", "en")
    if kind == "classification":
        assert all(r["is_classification"] for r in records)
        assert "negative, positive" in records[0]["instruction"]  # sorted labels seen
        assert "negative、positive" in records[1]["instruction"]


def test_bad_rows_are_reported_with_their_row_number_and_skipped(tmp_path, capsys):
    rows = [
        {"context": "A passage.", "question": "A question?", "answers": "An answer"},
        {"question": "No passage here?", "answers": "x"},  # the row lacks the column
        {"context": "Another passage.", "question": "   ", "answers": "x"},  # empty text
        {"context": "Third passage.", "question": "Is it fine?", "answers": "Yes"},
        {"context": "Fourth.", "question": "Odd answer?", "answers": 3.5},
    ]
    records, stats = run_convert(tmp_path, "qa", rows)
    assert [r["source_row"] for r in records] == [1, 4, 5]
    assert records[2]["output"] == "3.5"
    assert dict(stats.skipped) == {"missing context": 1, "empty question": 1}
    err = capsys.readouterr().err
    assert "in_qa.jsonl row 2: missing context; row skipped" in err
    assert "in_qa.jsonl row 3: empty question; row skipped" in err
    summary = json.loads((tmp_path / "out_qa.config.json").read_text())["summary"]
    assert summary["skipped"] == {"missing context": 1, "empty question": 1}
    assert summary["rows_read"] == 5 and summary["converted"] == 3


def test_squad_answers_and_unanswerable_questions(tmp_path):
    rows = [
        {"context": "Ada wrote the first program.", "question": "Who wrote it?",
         "answers": {"text": ["Ada", "Ada Lovelace"], "answer_start": [0, 0]}},
        {"context": "Ada wrote the first program.", "question": "When was she born?",
         "answers": {"text": [], "answer_start": []}},
        {"context": "エイダが最初のプログラムを書いた。", "question": "彼女はいつ生まれましたか？",
         "answers": {"text": [], "answer_start": []}},
    ]
    records, stats = run_convert(tmp_path, "qa", rows)
    assert [r["output"] for r in records] == ["Ada", convert_phrasings.UNANSWERABLE["en"],
                                              convert_phrasings.UNANSWERABLE["ja"]]
    assert stats.unanswerable == 2


def test_answer_column_falls_back_to_answer(tmp_path):
    rows = [{"context": "Water boils at 100 C.", "question": "At what temperature?", "answer": "100 C"}]
    records, _ = run_convert(tmp_path, "qa", rows, ".csv")
    assert records[0]["output"] == "100 C"


def test_whole_file_problems_are_user_errors_naming_the_flag(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"passage": "x", "question": "y", "answers": "z"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=r"--context-column: no column 'context' in qa.jsonl \(its columns: passage"):
        convert.run(Config(kind="qa", in_path=str(src), out=str(out)))
    records = convert.run(Config(kind="qa", in_path=str(src), out=str(out), context_column="passage"))
    assert records.converted == 1

    broken = tmp_path / "broken.jsonl"
    broken.write_text("this is not json\n")
    with pytest.raises(UserError, match=r"broken.jsonl:1: not valid JSON"):  # JSONL errors name the line
        convert.run(Config(kind="qa", in_path=str(broken), out=str(tmp_path / "b.jsonl")))
    with pytest.raises(UserError, match="no such file"):
        convert.run(Config(kind="qa", in_path=str(tmp_path / "absent.csv"), out=str(tmp_path / "c.jsonl")))
    with pytest.raises(UserError, match="unknown file type .txt"):
        (tmp_path / "notes.txt").write_text("x")
        convert.run(Config(kind="qa", in_path=str(tmp_path / "notes.txt"), out=str(tmp_path / "d.jsonl")))
    with pytest.raises(UserError, match="--dialogue-column: no 'messages' or 'conversations' column"):
        convert.run(Config(kind="dialogue", in_path=str(src), out=str(tmp_path / "e.jsonl")))

    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", [{"context": "", "question": "q", "answers": "a"}])
    with pytest.raises(UserError, match=r"none of its 1 rows could be converted: empty context \(1\)"):
        convert.run(Config(kind="qa", in_path=str(all_bad), out=str(tmp_path / "f.jsonl")))
    assert not (tmp_path / "f.jsonl").exists()


def test_flag_validation():
    with pytest.raises(UserError, match="--in"):
        Config(kind="qa")
    with pytest.raises(UserError, match="--labels"):
        Config(kind="classification", in_path="x.csv", labels=" , ")
    with pytest.raises(UserError, match="--source-lang/--target-lang"):
        Config(kind="translation", in_path="x.csv", source_lang="en")
    assert Config(kind="summarization", in_path="x.csv").out == "data/converted_summarization.jsonl"


def test_translation_columns_named_by_codes_and_the_translation_column(tmp_path):
    by_code = [{"en": "Good night.", "fr": "Bonne nuit."}]
    records, _ = run_convert(tmp_path, "translation", by_code, ".csv", source_lang="en", target_lang="fr")
    assert "from English to French" in records[0]["instruction"] or (
        "English" in records[0]["instruction"] and "French" in records[0]["instruction"])
    assert (records[0]["input"], records[0]["output"]) == ("Good night.", "Bonne nuit.")

    pairs = [{"translation": {"de": "Danke.", "en": "Thanks."}}, {"translation": {"de": "Hallo."}}]
    records, stats = run_convert(tmp_path, "translation", pairs, source_lang="de", target_lang="en")
    assert (records[0]["input"], records[0]["output"]) == ("Danke.", "Thanks.")
    assert "German" in records[0]["instruction"]
    assert dict(stats.skipped) == {"missing translation.en": 1}

    with pytest.raises(UserError, match="--source-column: no column 'source'"):
        run_convert(tmp_path, "translation", [{"text": "a", "target": "b"}])


def test_classification_label_list_and_numeric_labels(tmp_path, capsys):
    rows = [{"text": "Great!", "label": "pos"}, {"text": "Awful.", "label": "neg"}, {"text": "Hmm.", "label": "meh"}]
    records, stats = run_convert(tmp_path, "classification", rows, labels="pos,neg")
    assert [r["output"] for r in records] == ["pos", "neg"]
    assert "pos, neg" in records[0]["instruction"]  # the given order, not sorted
    assert dict(stats.skipped) == {"label not in --labels": 1}
    assert "row 3: label not in --labels" in capsys.readouterr().err

    numeric = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": None}]
    records, stats = run_convert(tmp_path, "classification", numeric, ".csv")
    assert [r["output"] for r in records] == ["1", "0"]  # a CSV int column with a blank is float: 1.0 -> "1"
    assert dict(stats.skipped) == {"missing label": 1}


def test_classification_uses_class_label_names():
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["sports", "politics"])})
    ds = Dataset.from_dict({"text": ["Goal!", "Vote."], "label": [0, 1]}, features=features)
    records, _ = convert_rows(Config(kind="classification", in_path="hub"), ds, ds.column_names, ds.features,
                              warn=lambda message: None)
    assert [r["output"] for r in records] == ["sports", "politics"]
    assert "sports, politics" in records[0]["instruction"]


def dialogue(rows, **flags):
    warnings = []
    records, stats = convert_rows(Config(kind="dialogue", in_path="log.jsonl", **flags), rows,
                                  list(dict.fromkeys(k for row in rows for k in row)), warn=warnings.append)
    return records, stats, warnings


def test_dialogue_with_a_broken_turn_keeps_the_good_turns():
    rows = [{"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user"},  # broken: no content
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "   "},  # empty
        {"role": "assistant", "content": "6."},
        {"role": "wizard", "content": "???"},  # unknown role
        "not a turn",
    ]}]
    records, stats, warnings = dialogue(rows)
    assert records[0]["messages"] == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."},
    ]
    assert dict(stats.turns_skipped) == {"missing content": 1, "empty content": 1, "unknown role 'wizard'": 1,
                                         "turn is not an object": 1}
    assert warnings[0] == "log.jsonl row 1 turn 3: missing content; turn skipped"
    assert len(warnings) == 4


def test_dialogue_merges_same_role_turns_and_reads_sharegpt():
    rows = [{"conversations": [
        {"from": "system", "value": "You are kind."},
        {"from": "gpt", "value": "Welcome!"},  # before any user turn: dropped
        {"from": "human", "value": "Hello."},
        {"from": "human", "value": "Are you there?"},
        {"from": "gpt", "value": "Yes."},
        {"from": "gpt", "value": "How can I help?"},
        {"from": "system", "value": "Late system prompt."},  # mid-conversation: dropped
        {"from": "human", "value": "Bye."},  # no reply: dropped
    ]}, {"conversations": [{"from": "human", "value": "Only a question."}]}]
    records, stats, warnings = dialogue(rows)
    assert records[0]["messages"] == [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Hello.\n\nAre you there?"},
        {"role": "assistant", "content": "Yes.\n\nHow can I help?"},
    ]
    assert stats.turns_merged == 2
    assert dict(stats.skipped) == {"no user turn with an assistant reply": 1}
    assert dict(stats.turns_skipped) == {"assistant turn before any user turn": 1, "user turn with no reply": 2,
                                         "system turn after the conversation started": 1}
    assert "log.jsonl row 2: no user turn with an assistant reply" not in warnings  # convert_rows words it
    assert "log.jsonl row 2: no user turn with an assistant reply; row skipped" in warnings


def test_dialogue_rows_that_are_not_conversations_are_skipped():
    rows = [{"messages": None}, {"messages": []}, {"messages": "{not json"}, {"messages": {"role": "user"}},
            {"messages": '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'}]
    records, stats, _ = dialogue(rows)
    assert [r["source_row"] for r in records] == [5]
    assert dict(stats.skipped) == {"missing messages": 1, "empty messages": 1, "messages is not valid JSON": 1,
                                   "messages is not a list of turns": 1}


def test_phrasings_vary_and_the_seed_fixes_them(tmp_path):
    rows = [{"document": f"Document number {i} says something.", "summary": f"Summary {i}."} for i in range(30)]
    cfg = Config(kind="summarization", in_path="docs.jsonl")
    columns = ["document", "summary"]
    first, _ = convert_rows(cfg, rows, columns, warn=print)
    again, _ = convert_rows(cfg, rows, columns, warn=print)
    other, _ = convert_rows(Config(kind="summarization", in_path="docs.jsonl", seed=7), rows, columns, warn=print)
    instructions = [r["instruction"] for r in first]
    assert instructions == [r["instruction"] for r in again]
    assert instructions != [r["instruction"] for r in other]
    assert len(set(instructions)) >= 3
    assert set(instructions) <= set(convert_phrasings.INSTRUCTIONS["summarization"]["en"])
    forced, _ = convert_rows(Config(kind="summarization", in_path="docs.jsonl", language="ja"), rows, columns)
    assert set(r["instruction"] for r in forced) <= set(convert_phrasings.INSTRUCTIONS["summarization"]["ja"])


def test_templates_are_complete():
    for kind, by_language in convert_phrasings.INSTRUCTIONS.items():
        assert set(by_language) == {"en", "ja"}, kind
        assert len(by_language["en"]) == len(by_language["ja"]) >= 3, kind
        assert len(set(by_language["en"])) == len(by_language["en"]), kind
    assert convert_phrasings.language_name("ja", "en") == "Japanese"
    assert convert_phrasings.language_name("en", "ja") == "英語"
    assert convert_phrasings.language_name("xx", "en") == "xx"


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    src = write_rows(tmp_path / "sst.csv", [{"text": "Nice.", "label": "good"}, {"text": "", "label": "bad"},
                                            {"text": "Poor.", "label": "bad"}])
    out = tmp_path / "converted.jsonl"
    cmd = [sys.executable, "-m", "pipeline", "convert", "--kind", "classification", "--in", str(src), "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 rows read" in result.stdout and "2 converted" in result.stdout and "1 skipped" in result.stdout
    assert "sst.csv row 2: missing text; row skipped" in result.stderr  # a blank CSV cell reads as missing
    assert [r["output"] for r in load_records(out)] == ["good", "bad"]
    assert json.loads((tmp_path / "converted.config.json").read_text())["config"]["kind"] == "classification"

    bad = subprocess.run([*cmd[:-4], "--in", str(src), "--label-column", "sentiment", "--out", str(tmp_path / "x.jsonl")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: --label-column: no column 'sentiment' in sst.csv (its columns: text, label)"]
    assert not (tmp_path / "x.jsonl").exists()


def test_dialogue_log_with_both_forms_reads_each_row_in_its_own(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}]}]
    records, stats = run_convert(tmp_path, "dialogue", rows)
    assert [r["messages"][1]["content"] for r in records] == ["Hello", "Hey"]
    with pytest.raises(UserError, match="--dialogue-column: no column 'turns'"):
        run_convert(tmp_path, "dialogue", rows, dialogue_column="turns")


def test_json_array_parquet_and_tsv_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ROWS["summarization"]
    (tmp_path / "docs.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "nested.json").write_text(json.dumps({"data": rows}, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    (tmp_path / "docs.tsv").write_text("document\tsummary\n" + "".join(f"{r['document']}\t{r['summary']}\n" for r in rows),
                                       encoding="utf-8")
    for name, flags in [("docs.json", {}), ("nested.json", {"json_field": "data"}), ("docs.parquet", {}),
                        ("docs.tsv", {})]:
        out = tmp_path / f"{name}.out.jsonl"
        convert.run(Config(kind="summarization", in_path=str(tmp_path / name), out=str(out), **flags))
        assert [r["output"] for r in load_records(out)] == OUTPUTS["summarization"], name
