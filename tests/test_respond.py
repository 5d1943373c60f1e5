"""pipeline/respond.py: the stage against the fake OpenAI server (real HTTP) and the fake client."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import respond
from pipeline.backends import Response
from pipeline.errors import UserError
from tests.conftest import write_jsonl
from tests.fakes import FakeClient

ROOT = Path(__file__).resolve().parents[1]

SEEDS = [
    {"id": "s_sent", "instruction": "Classify the sentiment of the review.", "is_classification": True,
     "instances": [{"input": "I loved it.", "output": "positive"}]},
    {"id": "s_even", "instruction": "Is the number even?", "is_classification": True,
     "instances": [{"input": "7", "output": "no"}]},
    {"id": "s_haiku", "instruction": "Write a haiku about rain.", "is_classification": False,
     "instances": [{"input": "", "output": "Rain taps the window"}]},
    {"id": "s_fr", "instruction": "Translate the word to French.", "is_classification": False,
     "instances": [{"input": "hello", "output": "bonjour"}]},
    {"id": "s_ja_cls", "instruction": "次の文の感情を分類してください。", "is_classification": True,
     "instances": [{"input": "とても楽しかった。", "output": "肯定的"}]},
    {"id": "s_ja_spam", "instruction": "このメールが迷惑メールかどうか判定してください。", "is_classification": True,
     "instances": [{"input": "当選しました！今すぐクリック", "output": "迷惑メール"}]},
    {"id": "s_ja_cap", "instruction": "日本の首都はどこですか？", "is_classification": False,
     "instances": [{"input": "", "output": "東京です。"}]},
    {"id": "s_ja_tr", "instruction": "次の文を英語に翻訳してください。", "is_classification": False,
     "instances": [{"input": "吾輩は猫である。", "output": "I am a cat."}]},
    {"id": "s_ja_haru", "instruction": "好きな季節について短い文を書いてください。", "is_classification": False,
     "instances": [{"input": "", "output": "春が好きです。"}]},
]
EN_SEED_TEXTS = [s["instruction"] for s in SEEDS if not s["id"].startswith("s_ja")]
JA_SEED_TEXTS = [s["instruction"] for s in SEEDS if s["id"].startswith("s_ja")]


def target_task(body: dict) -> str:
    """The instruction the request is about: the last user turn's task line."""
    last = body["messages"][-1]["content"] if "messages" in body else body["prompt"].rsplit("\n\n", 1)[-1]
    first = last.split("\n", 1)[0]
    return first.split(":", 1)[1].strip() if ":" in first else first


def is_decision(body: dict) -> bool:
    text = json.dumps(body, ensure_ascii=False)
    return "Is this a classification task?" in text or "分類タスクですか" in text


def is_output_first(body: dict) -> bool:
    return "class label" in json.dumps(body) or "クラスラベル" in json.dumps(body, ensure_ascii=False)


def smart_answer(body: dict) -> str:
    """A model that knows its tasks: sentiment and spam are classification; answers by path."""
    task = target_task(body)
    if is_decision(body):
        return "Yes" if ("sentiment" in task or "spam" in task) else "No."
    if is_output_first(body):
        return f"Label: positive\nInput: a fine example for {task}"
    return f"Input: something about {task}\nOutput: the answer for {task}"


@pytest.fixture
def seeds_file(tmp_path):
    return write_jsonl(tmp_path / "seeds.jsonl", SEEDS)


def instructions_file(tmp_path, records, name="filtered.jsonl"):
    return write_jsonl(tmp_path / name, records)


def config(tmp_path, in_path, seeds_file, **overrides):
    values = dict(in_path=str(in_path), seeds=str(seeds_file), out=str(tmp_path / "alpaca.jsonl"), cache=False,
                  cache_dir=str(tmp_path / "cache"), backend="openai", concurrency=4, max_retries=0)
    values.update(overrides)
    return respond.Config(**values)


def read(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def instance_bodies(server) -> dict[str, dict]:
    """Instance requests the server received, by the task they were about."""
    return {target_task(b): b for b in server.bodies if not is_decision(b)}


# ------------------------------------------------------------ paths and records


def test_classification_goes_output_first_others_input_first(tmp_path, seeds_file, fake_openai):
    fake_openai.answer = smart_answer
    tasks = [
        {"id": "i1", "instruction": "Detect whether the sentiment of the tweet is positive or negative."},
        {"id": "i2", "instruction": "Write a short poem about the sea."},
        {"id": "i3", "instruction": "Tell whether the email is spam."},
        {"id": "i4", "instruction": "Pick the odd word out.", "is_classification": True},
        {"id": "i5", "instruction": "Explain why the sky is blue.", "is_classification": False, "max_rouge_l": 0.2},
    ]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url)
    stats = respond.run(cfg)

    decisions = [target_task(b) for b in fake_openai.bodies if is_decision(b)]
    assert sorted(decisions) == sorted(t["instruction"] for t in tasks[:3])  # flagged ones are not asked
    bodies = instance_bodies(fake_openai)
    assert {t for t, b in bodies.items() if is_output_first(b)} == {tasks[0]["instruction"], tasks[2]["instruction"],
                                                                    tasks[3]["instruction"]}
    assert {t for t, b in bodies.items() if not is_output_first(b)} == {tasks[1]["instruction"], tasks[4]["instruction"]}
    # Output-first few-shot shows classification seeds' labels before their inputs.
    assert "Label: positive\nInput: I loved it." in json.dumps(bodies[tasks[0]["instruction"]]["messages"]).replace("\\n", "\n")

    records = {r["id"]: r for r in read(cfg.out)}
    assert set(records) == {"i1-0", "i2-0", "i3-0", "i4-0", "i5-0"}
    assert records["i1-0"]["output"] == "positive"
    assert records["i1-0"]["input"] == f"a fine example for {tasks[0]['instruction']}"
    assert records["i1-0"]["is_classification"] is True and records["i1-0"]["classification_source"] == "model"
    assert records["i2-0"]["is_classification"] is False and records["i2-0"]["classification_source"] == "model"
    assert records["i4-0"]["classification_source"] == "record"
    assert records["i2-0"]["output"] == f"the answer for {tasks[1]['instruction']}"
    assert records["i5-0"]["instruction_provenance"] == {"max_rouge_l": 0.2}
    assert records["i5-0"]["backend"] == "openai" and records["i5-0"]["finish_reason"] == "stop"
    assert records["i5-0"]["usage"]["completion_tokens"] > 0 and records["i5-0"]["request_id"]
    assert stats.written == 5 and stats.instructions_done == 5 and stats.rejected == {}
    assert stats.classification == {"model": 3, "record": 2}
    assert json.loads((tmp_path / "alpaca.config.json").read_text())["stats"]["written"] == 5


def test_japanese_instructions_get_japanese_few_shot(tmp_path, seeds_file, fake_openai):
    fake_openai.answer = lambda body: "いいえ" if is_decision(body) else "入力：なし\n出力：猫はかわいい動物です。"
    tasks = [{"id": "ja1", "instruction": "猫について短い文を書いてください。"}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url)
    respond.run(cfg)
    assert len(fake_openai.bodies) == 2
    for body in fake_openai.bodies:
        text = json.dumps(body["messages"], ensure_ascii=False)
        assert any(seed in text for seed in JA_SEED_TEXTS)
        assert not any(seed in text for seed in EN_SEED_TEXTS)
        assert "タスク:" in text
    instance = next(b for b in fake_openai.bodies if not is_decision(b))
    assert {"role": "assistant", "content": "入力: なし\n出力: 東京です。"} in instance["messages"]
    [record] = read(cfg.out)
    assert (record["input"], record["output"]) == ("", "猫はかわいい動物です。")
    assert record["is_classification"] is False


def test_japanese_request_quoting_english_gets_japanese_prompts_and_keeps_its_answer_line(tmp_path, seeds_file,
                                                                                           fake_openai):
    # Issue 14: the English it quotes does not make the request English, and a 「答え：」 line
    # inside the output is part of the output, not a new field.
    output = "The library is open from nine to five.\n答え：図書館は平日の九時から五時まで開いています。"
    fake_openai.answer = lambda body: "いいえ" if is_decision(body) else f"入力：なし\n出力：{output}"
    tasks = [{"id": "ja_en", "instruction": "次の英文を日本語に訳してください: The library is open from nine to five."}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url)
    respond.run(cfg)
    for body in fake_openai.bodies:
        text = json.dumps(body["messages"], ensure_ascii=False)
        assert "タスク:" in text and any(seed in text for seed in JA_SEED_TEXTS)
    [record] = read(cfg.out)
    assert record["output"] == output


def test_completions_api_sends_one_prompt_and_parses_the_continuation(tmp_path, seeds_file, fake_openai):
    # A base model continues the prompt, which already ends with "Input:".
    fake_openai.answer = lambda body: " No" if is_decision(body) else " 12\nOutput: even\n\nTask: next one"
    tasks = [{"id": "c1", "instruction": "Double the number."}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url,
                 api="completions")
    respond.run(cfg)
    assert all("prompt" in b and "messages" not in b for b in fake_openai.bodies)
    assert next(b for b in fake_openai.bodies if not is_decision(b))["prompt"].endswith("Task: Double the number.\nInput:")
    [record] = read(cfg.out)
    assert (record["input"], record["output"]) == ("12", "even")


# ------------------------------------------------------------ rejections


REJECT_CASES = {
    # instruction -> answers for instance 0 and 1 (K = 2)
    "Say nothing.": ["Input: None\nOutput:", "Output:   "],
    "Repeat the input.": ["Input: echo me\nOutput: Echo ME", "Input: echo me\nOutput:  echo   me"],
    "Write this instruction again.": ["Input: None\nOutput: Write this instruction again.",
                                      "Input: None\nOutput: write this instruction again."],
    "Describe the universe.": ["Input: None\nOutput: " + "word " * 30, "Input: None\nOutput: " + "more " * 30],
    "Name a colour.": ["Input: None\nOutput: Blue.", "Input: None\nOutput:   blue."],
    "Add one to the number.": ["Input: 3\nOutput: 4", "Input: 3\nOutput: 5"],
}
EXPECTED_REASONS = {
    "Say nothing.": ["empty_output", "empty_output"],
    "Repeat the input.": ["output_equals_input", "output_equals_input"],
    "Write this instruction again.": ["output_equals_instruction", "output_equals_instruction"],
    "Describe the universe.": ["too_long", "too_long"],
    "Name a colour.": [None, "duplicate_instance"],
    "Add one to the number.": [None, "conflicting_output"],
}


def by_instance_seed(body: dict) -> str:
    # Instance k is asked with seed 42 + k: the test answers instance 0 and 1 differently.
    return REJECT_CASES[target_task(body)][body["seed"] - 42]


def test_every_rejection_reason_from_a_case_built_for_it(tmp_path, seeds_file, fake_openai):
    fake_openai.answer = by_instance_seed
    tasks = [{"id": f"r{i}", "instruction": text, "is_classification": False} for i, text in enumerate(REJECT_CASES)]
    # One at a time, so which of the two instances comes first (kept) is fixed.
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url,
                 instances_per_instruction=2, max_output_words=20, concurrency=1)
    stats = respond.run(cfg)

    kept = {r["id"]: r for r in read(cfg.out)}
    rejected = {r["id"]: r for r in read(tmp_path / "alpaca.rejected.jsonl")}
    for i, (instruction, reasons) in enumerate(EXPECTED_REASONS.items()):
        for k, reason in enumerate(reasons):
            record_id = f"r{i}-{k}"
            if reason is None:
                assert record_id in kept and record_id not in rejected
            else:
                assert rejected[record_id]["reason"] == reason, instruction
                assert record_id not in kept
    assert rejected["r4-1"]["clashes_with"] == "r4-0"
    assert rejected["r5-1"]["clashes_with"] == "r5-0" and rejected["r5-1"]["output"] == "5"
    assert rejected["r0-0"]["raw_answer"] == "Input: None\nOutput:"
    assert stats.rejected == {"empty_output": 2, "output_equals_input": 2, "output_equals_instruction": 2,
                              "too_long": 2, "duplicate_instance": 1, "conflicting_output": 1}
    assert stats.written == 2 and stats.instructions_done == 6


def test_cut_off_answers_are_rejected(tmp_path, seeds_file, fake_openai):
    fake_openai.answer = lambda body: "Input: x\nOutput: a sentence that stops in the mid"
    fake_openai.finish_reason = "length"
    tasks = [{"id": "t1", "instruction": "Write a long story.", "is_classification": False}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url)
    stats = respond.run(cfg)
    assert read(cfg.out) == []
    [record] = read(tmp_path / "alpaca.rejected.jsonl")
    assert record["reason"] == "cut_off" and record["finish_reason"] == "length"
    assert stats.rejected == {"cut_off": 1}


def test_an_answer_that_stops_after_its_input_gets_a_follow_up(tmp_path, seeds_file, fake_openai):
    def answer(body):
        if len(body["messages"]) == 1:  # the follow-up: the task and the input, as in training
            return "The capital of Peru is Lima." if "Peru" in body["messages"][0]["content"] else ""
        return "Input: Peru" if "capital" in target_task(body) else "Input: something"

    fake_openai.answer = answer
    tasks = [{"id": "f1", "instruction": "Name the capital of the country.", "is_classification": False},
             {"id": "f2", "instruction": "Describe it.", "is_classification": False}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, base_url=fake_openai.base_url)
    stats = respond.run(cfg)
    followups = [b["messages"] for b in fake_openai.bodies if len(b["messages"]) == 1]
    assert [{"role": "user", "content": "Name the capital of the country.\n\nPeru"}] in followups
    [record] = read(cfg.out)
    assert (record["id"], record["input"], record["output"]) == ("f1-0", "Peru", "The capital of Peru is Lima.")
    assert record["followup"] is True and record["usage"]["prompt_tokens"] > 0
    [reject] = read(tmp_path / "alpaca.rejected.jsonl")
    assert (reject["id"], reject["reason"], reject["input"]) == ("f2-0", "empty_output", "something")
    assert stats.followups == 2 and stats.requests == 4


def test_no_input_task_keeps_different_outputs(tmp_path, seeds_file):
    # Two poems for "write a poem" are two good examples, not a conflict.
    client = FakeClient(lambda r: f"Input: None\nOutput: poem number {r.seed}")
    tasks = [{"id": "p", "instruction": "Write a poem.", "is_classification": False}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, instances_per_instruction=3)
    respond.run(cfg, client=client)
    assert [r["output"] for r in read(cfg.out)] == ["poem number 42", "poem number 43", "poem number 44"]


# ------------------------------------------------------------ files load with datasets


@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_outputs_load_with_datasets(tmp_path, seeds_file, fmt):
    import datasets

    answers = {"Name a colour.": "Input: None\nOutput: Blue.", "Say nothing.": "Input: None\nOutput:",
               "Sort the list.": "Input: 3, 1, 2\nOutput: 1, 2, 3", "Is it spam?": "Label: spam\nInput: WIN NOW"}
    client = FakeClient(lambda r: "Yes" if "classification task?" in r.messages[-1]["content"]
                        else answers[r.messages[-1]["content"].split(": ", 1)[1]])
    tasks = [{"id": "a", "instruction": "Name a colour.", "is_classification": False, "most_similar": ["s_fr"]},
             {"id": "b", "instruction": "Say nothing.", "is_classification": False},
             {"id": "c", "instruction": "Sort the list."},
             {"id": "d", "instruction": "Is it spam?"}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, format=fmt)
    respond.run(cfg, client=client)

    kept = datasets.load_dataset("json", data_files=cfg.out, split="train", cache_dir=str(tmp_path / "hf"))
    rejected = datasets.load_dataset("json", data_files=str(tmp_path / "alpaca.rejected.jsonl"), split="train",
                                     cache_dir=str(tmp_path / "hf"))
    assert kept.num_rows == 3 and rejected.num_rows == 1
    assert rejected[0]["reason"] == "empty_output"
    rows = {row["id"]: row for row in kept}
    if fmt == "messages":
        assert "instruction" not in kept.column_names
        assert rows["c-0"]["messages"] == [{"role": "user", "content": "Sort the list.\n\n3, 1, 2"},
                                           {"role": "assistant", "content": "1, 2, 3"}]
        assert rows["a-0"]["messages"][0]["content"] == "Name a colour."
    else:
        assert (rows["d-0"]["input"], rows["d-0"]["output"]) == ("WIN NOW", "spam")
    assert rows["d-0"]["is_classification"] is True


# ------------------------------------------------------------ resuming


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, seeds_file, fake_openai):
    def answer(body):
        if is_decision(body):
            return "No"
        task = target_task(body)
        # Every third instruction gives the same answer each time: its later instances are
        # rejected as duplicates, so both files grow while the run is killed.
        variant = 0 if task.endswith("!") else body["seed"]
        return f"Input: case {variant}\nOutput: answer {variant} for {task}"

    fake_openai.answer = answer
    fake_openai.latency = 0.03
    tasks = [{"id": f"k{i}", "instruction": f"Do thing {i}" + ("!" if i % 3 == 0 else ".")} for i in range(30)]
    in_path = instructions_file(tmp_path, tasks)
    out = tmp_path / "alpaca.jsonl"
    command = [sys.executable, "-m", "pipeline", "respond", "--in", str(in_path), "--seeds", str(seeds_file),
               "--out", str(out), "--backend", "openai", "--base-url", fake_openai.base_url, "--no-cache",
               "--instances-per-instruction", "3", "--concurrency", "2", "--model", "fake"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while _count_lines(out) < 10 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read(out)
    assert 10 <= len(before) < 90, "the run must be killed part way"
    started = {r["instruction_id"] for r in before}

    fake_openai.bodies.clear()
    fake_openai.latency = 0
    stats = respond.run(config(tmp_path, in_path, seeds_file, base_url=fake_openai.base_url, model="fake",
                               instances_per_instruction=3))
    ids = [r["id"] for r in read(out)] + [r["id"] for r in read(tmp_path / "alpaca.rejected.jsonl")]
    assert len(ids) == len(set(ids)), "no instance written twice"
    assert set(ids) == {f"k{i}-{k}" for i in range(30) for k in range(3)}, "no instance lost"
    # Half-done instructions were not asked the classification question again.
    asked = {target_task(b) for b in fake_openai.bodies if is_decision(b)}
    assert not asked & {t["instruction"] for t in tasks if t["id"] in started}
    assert stats.resumed >= len(before) and stats.instructions_done == 30
    rejected = read(tmp_path / "alpaca.rejected.jsonl")
    assert len(rejected) == 20 and {r["reason"] for r in rejected} == {"duplicate_instance"}


def test_rerun_of_a_finished_run_asks_nothing(tmp_path, seeds_file):
    client = FakeClient(lambda r: "No" if "classification" in r.messages[-1]["content"] else "Input: a\nOutput: b")
    tasks = [{"id": "x", "instruction": "Do x."}, {"id": "y", "instruction": "Do y."}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file)
    respond.run(cfg, client=client)
    asked = len(client.seen)
    stats = respond.run(cfg, client=client)
    assert len(client.seen) == asked and stats.written == 0 and stats.instructions_done == 2
    assert len(read(cfg.out)) == 2


def test_failed_requests_are_written_nowhere_and_asked_again(tmp_path, seeds_file):
    failing = FakeClient(lambda r: Response(request=r, error="HTTP 500: boom"))
    tasks = [{"id": "x", "instruction": "Do x.", "is_classification": False}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file)
    # The stage says how many failed, with the error, and exits non-zero (item 8 of issue 13).
    with pytest.raises(UserError, match=r"^1 requests failed after all retries \(HTTP 500: boom\); rerun"):
        respond.run(cfg, client=failing)
    assert read(cfg.out) == [] and read(tmp_path / "alpaca.rejected.jsonl") == []
    stats = respond.run(cfg, client=FakeClient(lambda r: "Input: a\nOutput: b"))
    assert stats.written == 1 and stats.failed == 0


def test_resuming_with_another_format_is_refused(tmp_path, seeds_file):
    client = FakeClient(lambda r: "Input: a\nOutput: b")
    tasks = [{"id": "x", "instruction": "Do x.", "is_classification": False}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file)
    respond.run(cfg, client=client)
    with pytest.raises(UserError, match="--format messages would mix"):
        respond.run(config(tmp_path, cfg.in_path, seeds_file, format="messages"), client=client)


# ------------------------------------------------------------ flags and input errors


def test_makefile_flags_parse():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(
        ["respond", "--in", "a.jsonl", "--seeds", "s.jsonl", "--out", "o.jsonl", "--format", "messages",
         "--instances-per-instruction", "2", "--backend", "openai", "--model", "m", "--api", "completions",
         "--concurrency", "8", "--seed", "7", "--base-url", "http://x/v1", "--no-cache", "--max-output-words", "50"])
    from pipeline.config import from_args

    cfg = from_args(respond.Config, args)
    assert (cfg.in_path, cfg.format, cfg.instances_per_instruction, cfg.api, cfg.seed, cfg.cache) == \
        ("a.jsonl", "messages", 2, "completions", 7, False)


@pytest.mark.parametrize("field, value, message", [
    ("instances_per_instruction", 0, "--instances-per-instruction"),
    ("max_output_words", 0, "--max-output-words"),
    ("top_p", 0.0, "--top-p"),
    ("concurrency", 0, "--concurrency"),
])
def test_bad_flags_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        respond.Config(**{field: value})


def test_bad_input_fails_before_anything_is_written(tmp_path, seeds_file):
    bad = instructions_file(tmp_path, [{"id": "a", "instruction": "Do a."}, {"id": "a", "instruction": "Do b."}])
    cfg = config(tmp_path, bad, seeds_file)
    with pytest.raises(UserError, match=r"filtered.jsonl:2: id: duplicate id 'a'"):
        respond.run(cfg, client=FakeClient(lambda r: "x"))
    assert not Path(cfg.out).exists()
    flag = instructions_file(tmp_path, [{"instruction": "Do a.", "is_classification": "yes"}], "flag.jsonl")
    with pytest.raises(UserError, match="flag.jsonl:1: is_classification"):
        respond.run(config(tmp_path, flag, seeds_file), client=FakeClient(lambda r: "x"))


# ------------------------------------------------------------ requests the server refuses, spending limits


def test_a_rejected_request_is_a_rejected_record_and_a_rerun_does_not_send_it(tmp_path, seeds_file, fake_openai):
    fake_openai.answer = smart_answer
    fake_openai.faults = ["422"]
    tasks = [{"id": "x", "instruction": "この文章を要約してください。", "is_classification": False},
             {"id": "y", "instruction": "Write a haiku about rain.", "is_classification": False}]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, concurrency=1,
                 base_url=fake_openai.base_url)
    stats = respond.run(cfg, client=None)
    [refused] = read(tmp_path / "alpaca.rejected.jsonl")
    assert (refused["id"], refused["reason"], refused["instruction"]) == ("x-0", "request_rejected", tasks[0]["instruction"])
    assert refused["error"] == (f"request rejected at {fake_openai.base_url} (422): "
                                "Input contains content that our safety system does not allow.")
    assert [r["id"] for r in read(cfg.out)] == ["y-0"] and stats.rejected == {"request_rejected": 1}
    sent = fake_openai.requests
    again = respond.run(cfg, client=None)
    assert fake_openai.requests == sent and again.instructions_done == 2


def test_respond_stops_at_its_token_limit_and_resumes(tmp_path, seeds_file, capsys):
    client = FakeClient(lambda r: "Input: a case\nOutput: an answer for " + r.key)
    tasks = [{"id": f"t{i}", "instruction": f"Do task {i}.", "is_classification": False} for i in range(20)]
    cfg = config(tmp_path, instructions_file(tmp_path, tasks), seeds_file, max_tokens_total=60, max_tokens=16)
    stats = respond.run(cfg, client=client)
    # Each answer costs 10 prompt + 8 completion tokens here; the limit lets about 60 through.
    assert stats.stopped == "max_tokens_total" and 60 <= stats.prompt_tokens + stats.completion_tokens <= 60 + 18
    assert 0 < stats.written < 20 and "--max-tokens-total reached" in capsys.readouterr().out
    done = respond.run(config(tmp_path, cfg.in_path, seeds_file), client=client)
    assert done.instructions_done == 20 and len(read(cfg.out)) == 20
