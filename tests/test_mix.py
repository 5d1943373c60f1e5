"""pipeline/mix.py: weighted mixing of instruction files, near-duplicates dropped across sources."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline import cli, mix
from pipeline.errors import InputError, UserError
from pipeline.jsonl import load_records

TOPICS = ["volcanoes", "tax law", "violin making", "bird migration", "sourdough bread", "chess openings",
          "tide pools", "railway signals", "knitting", "solar panels", "glaciers", "beekeeping"]


def alpaca(topic: str, verb: str = "Write a short poem about") -> dict:
    return {"instruction": f"{verb} {topic}.", "input": "", "output": f"Something about {topic}."}


def run_mix(tmp_path, sources: dict[str, list[dict]], **flags):
    paths = [str(write_jsonl(tmp_path / name, records)) for name, records in sources.items()]
    out = tmp_path / "train.jsonl"
    stats = mix.run(mix.Config(in_paths=tuple(paths), out=str(out), **flags))
    return load_records(out), stats


def test_weights_scale_each_source(tmp_path):
    a = [alpaca(t, "Write a short poem about") for t in TOPICS[:10]]
    b = [alpaca(t, "Explain to a child how to start with") for t in TOPICS[:10]]
    c = [alpaca(t, "List three surprising facts about") for t in TOPICS[:4]]
    records, stats = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b, "c.jsonl": c}, weights=(1, 0.5, 2.5))
    by_source = Counter(Path(r["mix_source"]).name for r in records)
    assert by_source == {"a.jsonl": 10, "b.jsonl": 5, "c.jsonl": 10}
    assert [(s.read, s.duplicates, s.kept, s.written) for s in stats.sources] == [
        (10, 0, 10, 10), (10, 0, 10, 5), (4, 0, 4, 10)]
    # Weight 1: every record once. Weight 0.5: five distinct records. Weight 2.5: each twice or three times.
    assert Counter(r["instruction"] for r in records if r["mix_source"].endswith("a.jsonl")) == \
        Counter(r["instruction"] for r in a)
    assert len({r["instruction"] for r in records if r["mix_source"].endswith("b.jsonl")}) == 5
    c_counts = Counter(r["instruction"] for r in records if r["mix_source"].endswith("c.jsonl"))
    assert sorted(c_counts.values()) == [2, 2, 3, 3]
    config = json.loads((tmp_path / "train.config.json").read_text())
    assert [s["written"] for s in config["sources"]] == [10, 5, 10] and config["written"] == 25


def test_cross_source_near_duplicates_are_dropped_keeping_the_first_source(tmp_path):
    a = [alpaca("volcanoes"), alpaca("tax law"), alpaca("glaciers")]
    b = [
        {"instruction": "Write a short poem about volcanoes.", "input": "", "output": "Exact copy, other output."},
        {"instruction": "Write a short poem about the volcanoes.", "input": "", "output": "Near copy."},
        alpaca("beekeeping", "Describe the history of"),
        alpaca("beekeeping", "Describe the history of"),  # a copy within one source stays
    ]
    records, stats = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b})
    assert [(s.duplicates, s.kept) for s in stats.sources] == [(0, 3), (2, 2)]
    volcano = [r for r in records if "volcanoes" in r["instruction"]]
    assert len(volcano) == 1 and volcano[0]["output"] == "Something about volcanoes."
    assert volcano[0]["mix_source"].endswith("a.jsonl")
    assert sum("beekeeping" in r["instruction"] for r in records) == 2


def test_dedupe_compares_instruction_with_input_and_first_user_turn(tmp_path):
    qa = "Answer the question using the passage."
    a = [{"instruction": qa, "input": "Paris is in France.\n\nQuestion: Where is Paris?", "output": "France"}]
    b = [
        # Same instruction phrasing, another passage: not a duplicate.
        {"instruction": qa, "input": "Bees make honey from nectar.\n\nQuestion: What do bees make?", "output": "Honey"},
        # A chat record asking what an Alpaca record of source a asked: a duplicate.
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": qa + "\nParis is in France.\n\nQuestion: Where is Paris?"},
                      {"role": "assistant", "content": "In France."}]},
        # A chat record with a new question.
        {"messages": [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": "A bot."}]},
    ]
    records, stats = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b})
    assert stats.sources[1].duplicates == 1
    assert len(records) == 3
    assert sum("messages" in r for r in records) == 1
    assert mix.dedupe_text(b[1]) == b[1]["messages"][1]["content"]


def test_japanese_near_duplicates_across_sources(tmp_path):
    a = [{"instruction": "日本の首都について短い説明を書いてください。", "output": "東京です。"}]
    b = [{"instruction": "日本の首都について短い説明を書いて下さい。", "output": "東京。"},
         {"instruction": "好きな季節とその理由を教えてください。", "output": "春です。"}]
    records, stats = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b})
    assert stats.sources[1].duplicates == 1 and len(records) == 2


def test_provenance_and_seeded_shuffle(tmp_path):
    a = [{**alpaca(t), "source": "squad.csv"} for t in TOPICS[:6]]
    b = [alpaca(t, "Tell a joke about") for t in TOPICS[6:]]
    first, _ = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b}, seed=1)
    again, _ = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b}, seed=1)
    other, _ = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b}, seed=2)
    assert first == again
    assert [r["instruction"] for r in first] != [r["instruction"] for r in other]
    assert sorted(r["instruction"] for r in first) == sorted(r["instruction"] for r in other)
    # Not left in file order: the shuffle mixes the sources.
    assert [r["mix_source"] for r in first] != sorted(r["mix_source"] for r in first)
    sources = {(Path(r["mix_source"]).name, r["source"]) for r in first}
    assert sources == {("a.jsonl", "squad.csv"), ("b.jsonl", str(tmp_path / "b.jsonl"))}


def test_weight_zero_leaves_a_source_out_entirely(tmp_path):
    a = [alpaca("glaciers")]
    b = [{**alpaca("glaciers"), "output": "from b"}]
    records, stats = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b}, weights=(0, 1))
    assert [r["output"] for r in records] == ["from b"]
    assert (stats.sources[0].read, stats.sources[0].written) == (1, 0)


def test_take_weighted_rounds_half_up_and_never_drops_with_weight_above_one():
    records = list(range(7))
    rng = random.Random(0)
    assert len(mix.take_weighted(records, 0.5, rng)) == 4  # 3.5 -> 4
    assert len(mix.take_weighted(records, 0.0, rng)) == 0
    taken = mix.take_weighted(records, 1.5, rng)
    assert len(taken) == 11 and set(taken) == set(records)
    assert sorted(mix.take_weighted(records, 1.0, rng)) == records


def test_bad_inputs_fail_before_writing(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [alpaca("knitting")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [alpaca("tides"), {"messages": [
        {"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    out = tmp_path / "train.jsonl"
    with pytest.raises(InputError, match=r"bad.jsonl:2: messages\[0\].role: 'robot' is not one of"):
        mix.run(mix.Config(in_paths=(str(good), str(bad)), out=str(out)))
    no_user = write_jsonl(tmp_path / "no_user.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(InputError, match="no_user.jsonl:1: messages: no user turn"):
        mix.run(mix.Config(in_paths=(str(no_user),), out=str(out)))
    no_output = write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": "Do it."}])
    with pytest.raises(InputError, match="no_output.jsonl:1: output: missing"):
        mix.run(mix.Config(in_paths=(str(no_output),), out=str(out)))
    assert not out.exists()
    with pytest.raises(UserError, match="--weights: 1 weights for 2 --in files"):
        mix.Config(in_paths=("a", "b"), weights=(1,))
    with pytest.raises(UserError, match="--weights: -1"):
        mix.Config(in_paths=("a",), weights=(-1,))
    with pytest.raises(UserError, match="--in"):
        mix.Config()
    with pytest.raises(UserError, match="--threshold"):
        mix.Config(in_paths=("a",), threshold=0)


@pytest.mark.slow
def test_qa_csv_translation_jsonl_and_dialogue_log_become_one_training_file(tmp_path, capsys, embedded_tokenizer_dir):
    """The issue's 'done when': convert three kinds of data, mix them, and tokenize every record for training."""
    (tmp_path / "qa.csv").write_text(
        "context,question,answers\n"
        "The Nile flows north into the Mediterranean.,Where does the Nile flow?,into the Mediterranean\n"
        "Mount Fuji is 3776 m high.,Who climbed it first?,\n"
        "富士山の高さは3776メートルです。,富士山の高さは？,3776メートル\n", encoding="utf-8")
    write_jsonl(tmp_path / "pairs.jsonl", [{"source": "Where is the station?", "target": "駅はどこですか？"},
                                          {"source": "I like tea.", "target": "私はお茶が好きです。"}])
    write_jsonl(tmp_path / "chats.jsonl", [
        {"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                           {"from": "human", "value": "Can you help me plan a trip?"},
                           {"from": "gpt", "value": "Of course. Where to?"},
                           {"from": "human", "value": "Kyoto, in spring."},
                           {"from": "gpt", "value": ""},
                           {"from": "gpt", "value": "Go in early April for the cherry blossoms."}]},
    ])
    data = tmp_path / "data"
    data.mkdir()
    for kind, src in [("qa", "qa.csv"), ("translation", "pairs.jsonl"), ("dialogue", "chats.jsonl")]:
        # The commands a user types, parsed by the real CLI (in-process: a subprocess each costs seconds).
        assert cli.main(["convert", "--kind", kind, "--in", str(tmp_path / src),
                         "--out", str(data / f"converted_{kind}.jsonl")]) == 0
    assert cli.main(["mix", "--in", *(str(data / f"converted_{kind}.jsonl") for kind in ("qa", "translation", "dialogue")),
                     "--weights", "1", "1", "2", "--out", str(data / "train.jsonl"), "--seed", "42"]) == 0
    assert "mix: 7 records" in capsys.readouterr().out

    records = load_records(data / "train.jsonl")
    assert Counter(r["kind"] for r in records) == {"qa": 3, "translation": 2, "dialogue": 2}
    chat = next(r for r in records if "messages" in r)
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert "The passage does not answer this question." in {r.get("output") for r in records}

    # What finetune does with each line (--template chat): the loss covers the assistant turns.
    from transformers import AutoTokenizer

    from pipeline.templates import encode_example

    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir)
    for record in records:
        encoded = encode_example(record, tokenizer, "chat", max_length=512)
        trained = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100])
        answers = ([m["content"] for m in record["messages"] if m["role"] == "assistant"]
                   if "messages" in record else [record["output"]])
        assert all(answer in trained for answer in answers), (record, trained)
        assert "Kyoto" not in trained and "helpful assistant" not in trained


def test_a_seed_file_is_a_source_of_one_record_per_instance(tmp_path):
    from pipeline.mix import Config, run

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"id": "seed_task_0", "instruction": "Name a primary colour.", "is_classification": False,
                                 "instances": [{"input": "", "output": "Red."}, {"input": "not blue", "output": "Yellow."}]}) + "\n")
    generated = tmp_path / "alpaca.jsonl"
    generated.write_text(json.dumps({"instruction": "Summarize the plot of Hamlet in one sentence.", "input": "", "output": "A prince avenges his father."}) + "\n")
    out = tmp_path / "train.jsonl"
    run(Config(in_paths=(str(generated), str(seeds)), out=str(out)))
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["output"])
    assert [(r["instruction"], r["input"], r["output"]) for r in records] == [
        ("Summarize the plot of Hamlet in one sentence.", "", "A prince avenges his father."),
        ("Name a primary colour.", "", "Red."),
        ("Name a primary colour.", "not blue", "Yellow."),
    ]
    assert {r["mix_source"] for r in records} == {str(generated), str(seeds)}


def test_a_score_exactly_at_the_threshold_is_kept_and_one_above_is_dropped(tmp_path):
    from pipeline.similarity import rouge_l, tokenize

    first = [{"instruction": "alpha beta", "input": "", "output": "x"}]
    tie = {"instruction": "alpha gamma", "input": "", "output": "y"}  # LCS 1 of 2 and 2 tokens: F1 exactly 0.5
    above = {"instruction": "alpha beta gamma", "input": "", "output": "z"}  # LCS 2: P 2/3, R 1: F1 0.8
    assert rouge_l(tokenize("alpha gamma"), tokenize("alpha beta")) == 0.5  # computed apart from mix
    records, stats = run_mix(tmp_path, {"a.jsonl": first, "b.jsonl": [tie, above]}, threshold=0.5)
    assert sorted(r["instruction"] for r in records) == ["alpha beta", "alpha gamma"]
    assert (stats.sources[1].duplicates, stats.sources[1].kept) == (1, 1)


def test_ids_are_never_written_twice(tmp_path):
    a = [{**alpaca("volcanoes"), "id": "machine_1"}, {**alpaca("glaciers"), "id": "machine_1#2"}]
    b = [{**alpaca("beekeeping", "日本語で説明して:"), "id": "machine_1"}, {**alpaca("knitting", "List three facts on"), "id": 7}]
    records, _ = run_mix(tmp_path, {"a.jsonl": a, "b.jsonl": b}, weights=(2, 1))
    ids = [str(r["id"]) for r in records]
    assert len(records) == 6 and len(ids) == len(set(ids)), ids
    by_text = {}
    for r in records:
        by_text.setdefault(r["instruction"], []).append((str(r["id"]), r.get("source_id")))
    # The first record with an id keeps it; a copy or a clash gets a fresh one and keeps its original.
    assert sorted(by_text["Write a short poem about volcanoes."]) == [("machine_1", None), ("machine_1#3", "machine_1")]
    assert sorted(by_text["Write a short poem about glaciers."]) == [("machine_1#2", None), ("machine_1#2#2", "machine_1#2")]
    assert by_text["日本語で説明して: beekeeping."] == [("machine_1#4", "machine_1")]
    assert by_text["List three facts on knitting."] == [("7", None)]
