"""pipeline/judge.py: the stage against the fake OpenAI server (real HTTP) and on the tiny local model."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import judge, judging
from pipeline.backends import BackendOptions, open_client
from pipeline.errors import InputError
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "r1", "instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    {"id": "r2", "instruction": "What is the capital of France?", "input": "", "output": "WRONG: Berlin"},
    {"id": "r3", "instruction": "次の文を英語に翻訳してください。", "input": "猫が好きです。", "output": "I like cats."},
    {"id": "r4", "instruction": "日本の首都はどこですか？", "input": "", "output": "WRONG: 大阪です。"},
    {"id": "r5", "instruction": "Is this review positive or negative?", "input": "I loved it.", "output": "positive",
     "is_classification": True},
]
ANSWER_SECTION = re.compile(r"(?:\[Answer to rate\]|【評価する回答】)\n(.*?)\n\n", re.S)


def judged_answer(body: dict) -> str:
    return ANSWER_SECTION.search(body["messages"][0]["content"]).group(1)


def is_japanese_prompt(body: dict) -> bool:
    return "審査員" in body["messages"][0]["content"]


def fair_judge(body: dict) -> str:
    """Scores 1 an answer marked WRONG, 5 otherwise; replies in the prompt's language."""
    score = 1 if "WRONG" in judged_answer(body) else 5
    reason = "計算と事実を確認しました。" if is_japanese_prompt(body) else "Checked the facts."
    return json.dumps({"reason": reason, "score": score}, ensure_ascii=False)


def read(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def config(tmp_path, in_path, server=None, **overrides) -> judge.Config:
    values = dict(in_path=str(in_path), out=str(tmp_path / "judged.jsonl"), cache_dir=str(tmp_path / "cache"),
                  backend="openai", model="fake-judge", base_url=server.base_url if server else None,
                  retry_base_delay=0.0, max_retries=1)
    values.update(overrides)
    return judge.Config(**values)


@pytest.fixture
def records_file(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)


def test_structured_output_scores_every_record(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    stats = judge.run(config(tmp_path, records_file, fake_openai))
    out = read(tmp_path / "judged.jsonl")
    assert {r["id"]: r["judge"]["score"] for r in out} == {"r1": 5, "r2": 1, "r3": 5, "r4": 1, "r5": 5}
    assert all(body["response_format"]["type"] == "json_schema" for body in fake_openai.bodies)
    first = next(r for r in out if r["id"] == "r1")
    assert first["judge"]["model"] == "fake-judge" and first["judge"]["rubric"] == "judge_pointwise_en"
    assert first["judge"]["reason"] == "Checked the facts." and first["judge"]["parsed_as"] == "json"
    assert len(first["judge"]["rubric_sha256"]) == judging.HASH_CHARS and first["input"] == "2 and 3"
    assert stats.histogram == {"1": 2, "2": 0, "3": 0, "4": 0, "5": 3} and stats.kept == 5
    assert stats.mean_by_language == {"en": pytest.approx(11 / 3, abs=1e-3), "ja": 3.0}
    assert stats.mean_by_kind == {"classification": 5.0, "no_input": 1.0, "with_input": 5.0}


def test_japanese_records_get_the_japanese_rubric_and_reason(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    judge.run(config(tmp_path, records_file, fake_openai))
    japanese = {b["messages"][0]["content"] for b in fake_openai.bodies if is_japanese_prompt(b)}
    assert len(japanese) == 2 and all("【指示】" in p and "自然な日本語" in p for p in japanese)
    assert any("【入力】\n猫が好きです。" in p for p in japanese)
    by_id = {r["id"]: r["judge"] for r in read(tmp_path / "judged.jsonl")}
    assert by_id["r3"]["rubric"] == "judge_pointwise_ja" and by_id["r3"]["reason"] == "計算と事実を確認しました。"
    assert by_id["r3"]["language"] == "ja" and by_id["r1"]["language"] == "en"


@pytest.mark.parametrize("reply, score", [
    ('Sure! {"reason": "fine", "score": 4}', 4), ("Rating: [[4]]", 4), ("Score: 3", 3), ("2/5", 2),
    ("評価：4", 4), ("理由：自然な訳です。\n評価：５", 5),
])
def test_server_that_ignores_the_schema_is_read_tolerantly(tmp_path, fake_openai, reply, score):
    fake_openai.answer = lambda body: reply
    in_path = write_jsonl(tmp_path / "one.jsonl", [RECORDS[2]])
    judge.run(config(tmp_path, in_path, fake_openai))
    (record,) = read(tmp_path / "judged.jsonl")
    assert record["judge"]["score"] == score and not record["judge"]["reasked"] and fake_openai.requests == 1


def test_unparseable_reply_is_asked_again_once_then_rejected(tmp_path, records_file, fake_openai):
    fake_openai.answer = lambda body: "I would rather not say." if "could not be read" not in json.dumps(body) \
        else "Still thinking about it."
    stats = judge.run(config(tmp_path, records_file, fake_openai))
    assert fake_openai.requests == 2 * len(RECORDS), "one re-ask per record, no more"
    rejected = read(tmp_path / "judged.rejected.jsonl")
    assert {r["reason"] for r in rejected} == {"judge_unparsed"} and len(rejected) == len(RECORDS)
    # Records finish in any order under concurrency; r1 is English, so its re-ask carries the English note.
    english = next(r for r in rejected if r["id"] == "r1")
    assert english["judge"]["raw_answers"] == ["I would rather not say.", "Still thinking about it."]
    assert read(tmp_path / "judged.jsonl") == [] and stats.rejected == {"judge_unparsed": len(RECORDS)}


def test_min_score_splits_kept_and_rejected(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    stats = judge.run(config(tmp_path, records_file, fake_openai, min_score=3))
    kept, rejected = read(tmp_path / "judged.jsonl"), read(tmp_path / "judged.rejected.jsonl")
    assert {r["id"] for r in kept} == {"r1", "r3", "r5"}
    assert {r["id"] for r in rejected} == {"r2", "r4"}
    assert all(r["reason"] == "low_score" and r["score"] == 1 and r["judge"]["reason"] for r in rejected)
    assert stats.rejected == {"low_score": 2} and stats.kept == 3


def test_changing_min_score_resplits_without_asking_again(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    judge.run(config(tmp_path, records_file, fake_openai, min_score=3, cache=False))
    asked = fake_openai.requests
    stats = judge.run(config(tmp_path, records_file, fake_openai, cache=False))
    kept = read(tmp_path / "judged.jsonl")
    assert len(kept) == 5 and read(tmp_path / "judged.rejected.jsonl") == [] and stats.moved == 2
    assert all("reason" not in r and "score" not in r for r in kept), "the reject fields leave with the reject"
    stats = judge.run(config(tmp_path, records_file, fake_openai, min_score=5, cache=False))
    assert {r["id"] for r in read(tmp_path / "judged.rejected.jsonl")} == {"r2", "r4"} and stats.moved == 2
    assert fake_openai.requests == asked


def test_reference_answer_reaches_the_judge(tmp_path, fake_openai):
    fake_openai.answer = fair_judge
    predictions = [{"id": "e1", "instruction": "What is 7 x 6?", "input": "", "output": "42", "prediction": "WRONG 48"}]
    judge.run(config(tmp_path, write_jsonl(tmp_path / "preds.jsonl", predictions), fake_openai))
    prompt = fake_openai.bodies[0]["messages"][0]["content"]
    assert "[Reference answer: correct; compare the answer with it]\n42" in prompt
    assert "[Answer to rate]\nWRONG 48" in prompt and read(tmp_path / "judged.jsonl")[0]["judge"]["score"] == 1


def test_messages_records_judge_the_last_answer(tmp_path, fake_openai):
    fake_openai.answer = fair_judge
    chat = [{"messages": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！"},
                          {"role": "user", "content": "富士山の高さは？"}, {"role": "assistant", "content": "3776メートルです。"}]}]
    judge.run(config(tmp_path, write_jsonl(tmp_path / "chat.jsonl", chat), fake_openai))
    prompt = fake_openai.bodies[0]["messages"][0]["content"]
    assert "【指示】\n富士山の高さは？" in prompt and "【評価する回答】\n3776メートルです。" in prompt
    assert read(tmp_path / "judged.jsonl")[0]["messages"] == chat[0]["messages"]


def test_probability_scoring_on_a_server_with_top_logprobs(tmp_path, records_file, fake_openai):
    fake_openai.answer = lambda body: "4"
    fake_openai.top_logprobs = lambda body: {"4": math.log(0.5), "5": math.log(0.3), "3": math.log(0.2)}
    judge.run(config(tmp_path, records_file, fake_openai, scoring="probs"))
    record = read(tmp_path / "judged.jsonl")[0]["judge"]
    assert record["score"] == pytest.approx(4.1) and record["scoring"] == "probs"
    assert record["distribution"] == {"1": 0.0, "2": 0.0, "3": 0.2, "4": 0.5, "5": 0.3}
    body = fake_openai.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == judging.TOP_LOGPROBS and body["max_tokens"] == 1
    assert "response_format" not in body


def test_probability_scoring_on_the_completions_endpoint(tmp_path, records_file, fake_openai):
    fake_openai.answer = lambda body: "2"
    fake_openai.top_logprobs = lambda body: {"2": math.log(0.75), "1": math.log(0.25)}
    judge.run(config(tmp_path, records_file, fake_openai, scoring="probs", api="completions"))
    assert read(tmp_path / "judged.jsonl")[0]["judge"]["score"] == pytest.approx(1.75)
    assert fake_openai.bodies[0]["logprobs"] == 5, "OpenAI's legacy endpoint allows at most 5 alternatives"


def test_cache_answers_a_second_run(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    judge.run(config(tmp_path, records_file, fake_openai))
    asked = fake_openai.requests
    stats = judge.run(config(tmp_path, records_file, fake_openai, out=str(tmp_path / "again.jsonl")))
    assert fake_openai.requests == asked and stats.cached == len(RECORDS)
    assert [r["judge"]["score"] for r in read(tmp_path / "again.jsonl")] != []
    assert all(r["judge"]["cached"] for r in read(tmp_path / "again.jsonl"))


def test_rerun_of_a_finished_run_asks_nothing(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    cfg = config(tmp_path, records_file, fake_openai, cache=False, min_score=2)
    judge.run(cfg)
    asked = fake_openai.requests
    stats = judge.run(cfg)
    assert fake_openai.requests == asked and stats.judged == 0 and stats.resumed == len(RECORDS)
    assert stats.histogram == {"1": 2, "2": 0, "3": 0, "4": 0, "5": 3}, "the summary covers earlier runs' records"


def test_identical_records_are_each_judged(tmp_path, fake_openai):
    fake_openai.answer = fair_judge
    in_path = write_jsonl(tmp_path / "twins.jsonl", [RECORDS[0], RECORDS[0]])
    judge.run(config(tmp_path, in_path, fake_openai))
    keys = [r["judge"]["record_key"] for r in read(tmp_path / "judged.jsonl")]
    assert len(keys) == 2 and len(set(keys)) == 2


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, fake_openai):
    fake_openai.answer = fair_judge
    fake_openai.latency = 0.03
    records = [{"id": f"k{i}", "instruction": f"Say the number {i}.", "input": "", "output": str(i) if i % 4 else "WRONG"}
               for i in range(40)]
    in_path = write_jsonl(tmp_path / "many.jsonl", records)
    out = tmp_path / "judged.jsonl"
    command = [sys.executable, "-m", "pipeline", "judge", "--in", str(in_path), "--out", str(out), "--backend", "openai",
               "--base-url", fake_openai.base_url, "--model", "fake-judge", "--no-cache", "--concurrency", "2",
               "--min-score", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while len(read(out)) < 8 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(read(out)) + len(read(tmp_path / "judged.rejected.jsonl"))
    assert 8 <= before < 40, "the run must be killed part way"
    fake_openai.latency = 0
    fake_openai.bodies.clear()
    stats = judge.run(config(tmp_path, in_path, fake_openai, cache=False, min_score=2))
    kept, rejected = read(out), read(tmp_path / "judged.rejected.jsonl")
    ids = [r["id"] for r in kept + rejected]
    assert len(ids) == len(set(ids)) == 40, "every record exactly once"
    assert {r["id"] for r in rejected} == {f"k{i}" for i in range(0, 40, 4)}
    assert len(fake_openai.bodies) == 40 - stats.resumed and stats.resumed >= before


def test_token_limit_stops_cleanly_and_a_rerun_continues(tmp_path, records_file, fake_openai):
    fake_openai.answer = fair_judge
    stats = judge.run(config(tmp_path, records_file, fake_openai, concurrency=1, max_tokens_total=300, cache=False))
    assert stats.stopped == "max_tokens_total" and 0 < stats.judged < len(RECORDS)
    rest = judge.run(config(tmp_path, records_file, fake_openai, cache=False))
    assert rest.resumed == stats.judged and len(read(tmp_path / "judged.jsonl")) == len(RECORDS)


def test_always_a_judge_gives_ties_over_real_http(fake_openai):
    fake_openai.answer = lambda body: '{"reason": "The first one.", "winner": "A"}'
    client = open_client(BackendOptions(backend="openai", base_url=fake_openai.base_url, model="biased", cache=False))
    pairs = [judging.Pair(f"p{i}", "What is 2 + 3?", "5", "6") for i in range(4)]
    try:
        verdicts = [v for _, v in judging.pairwise_verdicts(client, pairs, judging.JudgeSettings())]
    finally:
        client.close()
    assert [v.winner for v in verdicts] == ["tie"] * 4 and judging.flip_share(verdicts) == 1.0
    assert fake_openai.requests == 8 and fake_openai.bodies[0]["response_format"]["json_schema"]["name"] == "verdict"


def test_bad_record_is_one_line_naming_file_and_line(tmp_path):
    in_path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"instruction": "no output here"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: output: missing"):
        judge.run(config(tmp_path, in_path))
    assert not (tmp_path / "judged.jsonl").exists()


def test_out_written_by_another_stage_is_refused(tmp_path, records_file, fake_openai):
    write_jsonl(tmp_path / "judged.jsonl", RECORDS[:1])
    with pytest.raises(InputError, match=r"judged.jsonl:1: judge.record_key: missing"):
        judge.run(config(tmp_path, records_file, fake_openai))


@pytest.mark.parametrize("flags, message", [
    (["--min-score", "9"], "[1, 5]"),
    (["--rubric", "missing.txt"], "--rubric missing.txt: no such file"),
    (["--scoring", "vibes"], "invalid choice"),
])
def test_cli_flag_errors_are_one_line(tmp_path, records_file, flags, message):
    result = subprocess.run([sys.executable, "-m", "pipeline", "judge", "--in", str(records_file),
                             "--out", str(tmp_path / "o.jsonl"), *flags], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert flags[0] in result.stderr.strip().splitlines()[-1], "the error line names the flag"


def test_local_probability_score_on_the_tiny_model_is_in_range_and_stable(tmp_path, tiny_model_dir):
    records = [RECORDS[0], RECORDS[2]]
    in_path = write_jsonl(tmp_path / "two.jsonl", records)
    scores = []
    for run_number in range(2):
        out = tmp_path / f"judged{run_number}.jsonl"
        judge.run(judge.Config(in_path=str(in_path), out=str(out), backend="local", model=str(tiny_model_dir),
                               device="cpu", cache=False))
        judged = read(out)
        scores.append([r["judge"]["score"] for r in judged])
        assert all(r["judge"]["scoring"] == "probs" and 1 <= r["judge"]["score"] <= 5 for r in judged)
        assert all(sum(r["judge"]["distribution"].values()) == pytest.approx(1, abs=1e-3) for r in judged)
    assert scores[0] == pytest.approx(scores[1], abs=1e-4) and len(scores[0]) == 2


def test_inspect_shows_the_judges_histogram_lowest_records_and_a_sortable_score_column(tmp_path, capsys):
    from pipeline import inspect

    records = [{**RECORDS[0], "judge": {"score": 4.6, "reason": "Correct."}},
               {**RECORDS[3], "judge": {"score": 1.2, "reason": "首都は東京です。"}},
               {**RECORDS[1], "judge": {"score": 2, "reason": "Berlin is wrong."}}]
    path = write_jsonl(tmp_path / "judged.jsonl", records)
    summary = inspect.run(inspect.Config(file=str(path), html=str(tmp_path / "report.html"), seeds=str(tmp_path / "none")))
    assert summary["judge"]["histogram"] == {"1": 1, "2": 1, "3": 0, "4": 0, "5": 1}
    assert [low["score"] for low in summary["judge"]["lowest"]] == [1.2, 2.0, 4.6]
    printed = capsys.readouterr().out
    assert "judge scores (3 scored, mean 2.60" in printed and "1.20 #2: 日本の首都はどこですか？ -- 首都は東京です。" in printed
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<th data-sort>judge score</th>" in page and '<td title="首都は東京です。">1.2</td>' in page
    assert "th[data-sort]" in page, "the column header sorts the table"


def test_cached_probability_answers_keep_their_distribution(tmp_path, records_file, fake_openai):
    fake_openai.answer = lambda body: "4"
    fake_openai.top_logprobs = lambda body: {"4": math.log(0.6), "2": math.log(0.4)}
    judge.run(config(tmp_path, records_file, fake_openai, scoring="probs"))
    asked = fake_openai.requests
    judge.run(config(tmp_path, records_file, fake_openai, scoring="probs", out=str(tmp_path / "again.jsonl")))
    again = read(tmp_path / "again.jsonl")
    assert fake_openai.requests == asked and all(r["judge"]["cached"] for r in again)
    assert again[0]["judge"]["score"] == pytest.approx(3.2) and again[0]["judge"]["distribution"]["2"] == 0.4


def test_new_request_fields_leave_older_cache_keys_unchanged():
    import dataclasses
    import hashlib

    from pipeline import cache
    from pipeline.backends import Request

    request = Request(key="k", messages=({"role": "user", "content": "日本語の質問"},), temperature=0.0)
    fields = {k: v for k, v in dataclasses.asdict(request).items()
              if k != "key" and k not in ("top_logprobs", "logprob_tokens", "response_format")}
    payload = {"format": cache.CACHE_FORMAT, "backend": "openai", "model": "m", "api": "chat", "request": fields}
    before = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert cache.request_key(request, "openai", "m", "chat") == before
    assert cache.request_key(dataclasses.replace(request, top_logprobs=20), "openai", "m", "chat") != before
