"""`label`: a person's choices, driven through stdin: keys, quit and resume, EOF, bad keys, Japanese."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import label as label_stage
from pipeline.errors import InputError
from pipeline.preferences import load_pairs, make_label, make_pair, pair_key
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def pairs_file(tmp_path, count=3):
    pairs = [make_pair("ja", "日本の首都はどこですか。", "一言で答えてください。", "東京です。", "大阪です。",
                       scores={"chosen": 5, "rejected": 1})]
    pairs += [make_pair(f"en-{i}", f"Add {i} and {i}.", "", f"{2 * i}", f"{2 * i + 1}") for i in range(1, count)]
    return write_jsonl(tmp_path / "preferences.jsonl", pairs)


def label(path, keys: str, **flags):
    screen = io.StringIO()
    stats = label_stage.run(label_stage.Config(file=str(path), **flags), keys=io.StringIO(keys), screen=screen)
    return stats, screen.getvalue()


def read_labels(path) -> list[dict]:
    labels = Path(path).with_name("preferences.labels.jsonl")
    return [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()] if labels.exists() else []


def key_for(seed, pair, want):
    """The key that picks the judge's `want` answer, given the order the pair is shown in."""
    return "1" if label_stage.shown_first(seed, pair) == want else "2"


def test_keys_become_labels_that_name_the_judges_answers(tmp_path):
    path = pairs_file(tmp_path)
    ja, en1, en2 = load_pairs(path)
    keys = key_for(0, ja, "chosen") + "\n" + key_for(0, en1, "rejected") + "\nt\n"
    stats, screen = label(path, keys)
    labels = read_labels(path)
    assert [(l["id"], l["choice"]) for l in labels] == [("ja", "chosen"), ("en-1", "rejected"), ("en-2", "tie")]
    assert [l["shown_first"] for l in labels] == [label_stage.shown_first(0, p) for p in (ja, en1, en2)]
    assert [l["pair"] for l in labels] == [pair_key(p) for p in (ja, en1, en2)]
    assert (stats.labelled, stats.left, stats.quit) == (3, 0, False)
    # 1 agreed of the 2 pairs with a preference
    assert (stats.agreement.agreed, stats.agreement.compared, stats.agreement.ties) == (1, 2, 1)
    assert "the judge agreed with you on 1 of the 2 pair(s) where you preferred one answer (50%)" in screen


def test_quit_then_resume_asks_only_the_pairs_not_labelled(tmp_path):
    path = pairs_file(tmp_path)
    stats, screen = label(path, "1\nq\n")
    assert stats.quit and (stats.labelled, stats.left) == (1, 2)
    assert [l["id"] for l in read_labels(path)] == ["ja"]
    assert "rerun the same command to continue" in screen
    stats, screen = label(path, "2\ns\n")
    assert "日本の首都" not in screen  # the labelled pair is not shown again
    assert [(l["id"], l["choice"] == "skip") for l in read_labels(path)] == [("ja", False), ("en-1", False), ("en-2", True)]
    assert (stats.labelled, stats.left, stats.quit) == (2, 1, False)
    assert "--revisit-skipped shows the 1 skipped pair(s) again" in screen
    # a skip counts as seen: not asked again, unless asked for
    stats, screen = label(path, "")
    assert stats.labelled == 0 and "every pair in" in screen and "Add 2 and 2." not in screen
    stats, screen = label(path, "t\n", revisit_skipped=True)
    assert "Add 2 and 2." in screen and "Add 1 and 1." not in screen
    assert read_labels(path)[-1]["choice"] == "tie" and stats.left == 0


def test_a_bad_key_is_asked_again_and_full_width_keys_count(tmp_path):
    path = pairs_file(tmp_path, count=1)
    [pair] = load_pairs(path)
    full_width = {"1": "１", "2": "２"}[key_for(0, pair, "rejected")]
    stats, screen = label(path, f"x\n\n3\n{full_width}\n")
    assert screen.count("is not a key here") == 3
    assert [l["choice"] for l in read_labels(path)] == ["rejected"]


def test_end_of_input_stops_cleanly_and_keeps_what_was_chosen(tmp_path):
    path = pairs_file(tmp_path)
    stats, screen = label(path, "t\n")  # no newline-terminated key for the second pair: EOF
    assert stats.quit and stats.labelled == 1
    assert [l["choice"] for l in read_labels(path)] == ["tie"]
    stats, _ = label(path, "")
    assert stats.quit and stats.labelled == 0
    assert [l["id"] for l in read_labels(path)] == ["ja"]  # nothing written for a pair without a key


def test_no_choice_leaves_no_labels_file(tmp_path):
    path = pairs_file(tmp_path)
    label(path, "q\n")
    assert not tmp_path.joinpath("preferences.labels.jsonl").exists()


def test_the_order_is_random_per_pair_seeded_and_stable():
    pairs = [{"id": f"p{i}"} for i in range(40)]
    order = [label_stage.shown_first(0, p) for p in pairs]
    assert 10 < order.count("chosen") < 30  # both orders, about half each
    assert order == [label_stage.shown_first(0, p) for p in pairs]  # same on a rerun
    assert order != [label_stage.shown_first(1, p) for p in pairs]  # another seed, another order


def test_answers_are_shown_in_the_drawn_order_without_the_judges_scores(tmp_path):
    path = pairs_file(tmp_path, count=1)
    [pair] = load_pairs(path)
    _, screen = label(path, "q\n")
    first, second = ("東京です。", "大阪です。") if label_stage.shown_first(0, pair) == "chosen" else ("大阪です。", "東京です。")
    assert screen.index("[1]") < screen.index(first) < screen.index("[2]") < screen.index(second)
    assert "chosen" not in screen.split("better answer?")[0] and "score" not in screen.lower()


def test_a_label_for_changed_answers_is_stale_and_the_pair_is_asked_again(tmp_path):
    path = pairs_file(tmp_path, count=1)
    [pair] = load_pairs(path)
    old = make_label({**pair, "rejected": "京都です。"}, "chosen", "chosen", "2026-01-01T00:00:00+00:00")
    write_jsonl(tmp_path / "preferences.labels.jsonl", [old])
    stats, screen = label(path, "t\n")
    assert stats.stale == 1 and "1 earlier label(s)" in screen and "日本の首都" in screen
    assert read_labels(path)[-1]["choice"] == "tie"


def test_a_bad_labels_file_names_its_line_and_field(tmp_path):
    path = pairs_file(tmp_path, count=1)
    [pair] = load_pairs(path)
    write_jsonl(tmp_path / "preferences.labels.jsonl", [make_label(pair, "tie", "chosen", "t"), {**make_label(pair, "tie", "chosen", "t"), "choice": "maybe"}])
    with pytest.raises(InputError, match=r"preferences\.labels\.jsonl:2: choice: 'maybe'"):
        label(path, "1\n")


def run_cli(*args, keys: str):
    return subprocess.run([sys.executable, "-m", "pipeline", "label", *args], cwd=ROOT, input=keys.encode("utf-8"),
                          capture_output=True)


def test_the_command_shows_japanese_and_reads_keys_from_stdin(tmp_path):
    path = pairs_file(tmp_path, count=2)
    result = run_cli(str(path), keys="１\nq\n")
    out = result.stdout.decode("utf-8")
    assert result.returncode == 0, result.stderr.decode()
    for text in ("日本の首都はどこですか。", "一言で答えてください。", "東京です。", "大阪です。"):
        assert text in out
    assert "Add 1 and 1." in out and "rerun the same command" in out
    assert len(read_labels(path)) == 1
    result = run_cli(str(path), keys="")  # EOF at once: a clean stop
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert "日本の首都" not in result.stdout.decode("utf-8")


def test_a_bad_pairs_file_is_one_line_and_exit_2(tmp_path):
    bad = write_jsonl(tmp_path / "preferences.jsonl", [{"id": "a", "prompt": "p", "chosen": "同じ", "rejected": "同じ"}])
    result = run_cli(str(bad), keys="1\n")
    err = result.stderr.decode("utf-8").strip()
    assert result.returncode == 2 and err.splitlines() == [f"error: {bad}:1: rejected: the same answer as chosen: there is nothing to prefer"]


def test_a_second_run_on_the_same_labels_refuses_at_once(tmp_path):
    from pipeline.jsonl import output_lock

    path = pairs_file(tmp_path, count=1)
    with output_lock(tmp_path / "preferences.labels.jsonl"):  # a first session still open
        result = run_cli(str(path), keys="1\n")
    err = result.stderr.decode("utf-8")
    assert result.returncode == 2 and "another run is writing it" in err and len(err.strip().splitlines()) == 1
    assert read_labels(path) == []


def test_the_labels_cannot_overwrite_the_pairs(tmp_path):
    path = pairs_file(tmp_path, count=1)
    before = path.read_bytes()
    result = run_cli(str(path), "--out", str(path), keys="1\n")
    assert result.returncode == 2 and "is the input FILE" in result.stderr.decode("utf-8")
    assert path.read_bytes() == before


def test_a_file_with_a_persons_choices_is_labelled_in_the_judges_order(tmp_path):
    from pipeline.preferences import apply_labels

    path = pairs_file(tmp_path, count=1)
    [pair] = load_pairs(path)
    overridden = apply_labels([pair], [make_label(pair, "rejected", "chosen", "t")]).pairs
    write_jsonl(path, overridden)  # what prefs --labels writes: 大阪です。 is chosen now
    stats, _ = label(path, key_for(0, pair, "chosen") + "\n")
    # "chosen" names the judge's answer, 東京です。, whatever the file's current order
    assert read_labels(path)[-1]["choice"] == "chosen" and read_labels(path)[-1]["pair"] == pair_key(pair)
    assert stats.agreement.agreed == 1
