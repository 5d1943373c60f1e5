"""pipeline/prefs.py: preference pairs against the fake OpenAI server (policy and judge, real HTTP) and the tiny model.

The one fake server plays both roles; the request's `model` says which: "policy" samples answers
whose quality the test knows (a GOOD / OK / BAD marker), "judge" scores and compares them.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import prefs
from pipeline.preferences import load_pairs, make_label
from pipeline.seeds import load_seed_split
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "seeds" / "seed_tasks.jsonl"
QUALITY = {"GOOD": 5, "OK": 3, "BAD": 1}
# What the policy answers, one text per choice (n=4): the best is GOOD, the worst BAD, whatever the order.
ANSWERS = {
    "Add the two numbers.": ["OK: five, I think.", "BAD: 23", "GOOD: 2 + 3 = 5", "OK: it is 5"],
    "Name a primary colour.": ["BAD: green", "GOOD: red", "OK: red-ish", "OK: maybe blue"],
    "次の文を英語に翻訳してください。": ["OK: I like cat.", "GOOD: I like cats.", "BAD: 猫が好き", "OK: Cats I like."],
}
RECORDS = [
    {"id": "t1", "instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    {"id": "t2", "instruction": "Name a primary colour.", "input": "", "output": "red"},
    {"id": "t3", "instruction": "次の文を英語に翻訳してください。", "input": "猫が好きです。", "output": "I like cats."},
]
POINTWISE = re.compile(r"(?:\[Answer to rate\]|【評価する回答】)\n(.*?)\n\n", re.S)
PAIRWISE = re.compile(r"(?:\[Answer A\]|【回答A】)\n(.*?)\n\n(?:\[Answer B\]|【回答B】)\n(.*?)\n\n", re.S)


def quality(answer: str) -> int:
    return next(score for marker, score in QUALITY.items() if answer.startswith(marker))


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"]


def is_policy(body: dict) -> bool:
    return body["model"] == "policy"


def policy_answers(body: dict) -> list[str]:
    return ANSWERS[prompt_of(body).split("\n\n")[0]]


def fair_judge(body: dict) -> str:
    """Scores by the marker; prefers the better marker pairwise; reasons in the prompt's language."""
    text = prompt_of(body)
    reason = "指示どおりです。" if "審査員" in text else "It does what was asked."
    pair = PAIRWISE.search(text)
    if pair:
        a, b = (quality(x) for x in pair.groups())
        return json.dumps({"reason": reason, "winner": "A" if a > b else "B" if b > a else "tie"}, ensure_ascii=False)
    return json.dumps({"reason": reason, "score": quality(POINTWISE.search(text).group(1))}, ensure_ascii=False)


def serve(policy=policy_answers, judge=fair_judge):
    return lambda body: policy(body) if is_policy(body) else judge(body)


def read(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.exists() else []


def config(tmp_path, in_path, server, **overrides) -> prefs.Config:
    values = dict(in_path=str(in_path), out=str(tmp_path / "prefs.jsonl"), cache_dir=str(tmp_path / "cache"),
                  backend="openai", model="policy", judge_model="judge", base_url=server.base_url,
                  seeds=str(SEEDS), retry_base_delay=0.0, max_retries=1)
    values.update(overrides)
    return prefs.Config(**values)


@pytest.fixture
def records_file(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)


def test_the_best_answer_is_chosen_and_the_worst_rejected(tmp_path, records_file, fake_openai):
    fake_openai.answer = serve()
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    pairs = {p["id"]: p for p in load_pairs(tmp_path / "prefs.jsonl")}
    assert set(pairs) == {"t1", "t2", "t3"} and stats.written == 3 and not stats.rejected
    for pair in pairs.values():
        assert pair["chosen"].startswith("GOOD") and pair["rejected"].startswith("BAD")
        assert pair["scores"] == {"chosen": 5, "rejected": 1} and pair["margin"] == 4
        assert pair["models"] == {"policy": "policy", "judge": "judge"} and pair["label_source"] == "judge"
        assert pair["judge"]["pairwise"]["orders"] == ["a", "a"], "both orders preferred the pointwise best"
    assert pairs["t1"]["input"] == "2 and 3" and "### Input:\n2 and 3" in pairs["t1"]["prompt"]
    sampled = [b for b in fake_openai.bodies if is_policy(b)]
    assert len(sampled) == 3 and all(b["n"] == 4 and b["temperature"] == prefs.SAMPLE_TEMPERATURE for b in sampled)
    judged = [b for b in fake_openai.bodies if not is_policy(b)]
    assert len(judged) == 3 * 4 + 3 * 2, "four scores and two orders per instruction"
    assert stats.margin_histogram == {"0-1": 0, "1-2": 0, "2-3": 0, "3-4": 3}


def test_japanese_instruction_end_to_end_in_the_conversational_form(tmp_path, fake_openai):
    fake_openai.answer = serve()
    in_path = write_jsonl(tmp_path / "ja.jsonl", [RECORDS[2]])
    prefs.run(config(tmp_path, in_path, fake_openai, format="messages"))
    raw = (tmp_path / "prefs.jsonl").read_text(encoding="utf-8")
    assert "次の文を英語に翻訳してください。" in raw and "指示どおりです。" in raw, "Japanese stays readable in the file"
    (pair,) = load_pairs(tmp_path / "prefs.jsonl")
    assert pair["prompt"] == [{"role": "user", "content": "次の文を英語に翻訳してください。\n\n猫が好きです。"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "GOOD: I like cats."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "BAD: 猫が好き"}]
    assert pair["reasons"] == {"chosen": "指示どおりです。", "rejected": "指示どおりです。"}
    judged = [prompt_of(b) for b in fake_openai.bodies if not is_policy(b)]
    assert all("審査員" in text and "【指示】" in text for text in judged), "the Japanese rubrics judged it"


def test_a_position_biased_judge_never_produces_a_reversed_pair(tmp_path, records_file, fake_openai):
    def always_a(body):
        if PAIRWISE.search(prompt_of(body)):
            return '{"reason": "The first one.", "winner": "A"}'
        return fair_judge(body)

    fake_openai.answer = serve(judge=always_a)
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    assert not (tmp_path / "prefs.jsonl").exists(), "no pair at all, so none reversed"
    rejected = read(tmp_path / "prefs.rejected.jsonl")
    assert {r["reason"] for r in rejected} == {prefs.FLIP} and len(rejected) == 3 and stats.flips == 3
    assert all(r["judge"]["pairwise"]["orders"] == ["a", "b"] for r in rejected)


def test_a_pairwise_verdict_against_the_scores_is_rejected(tmp_path, records_file, fake_openai):
    def contrary(body):
        pair = PAIRWISE.search(prompt_of(body))
        if pair:  # prefers the worse answer, consistently in both orders
            return json.dumps({"reason": "x", "winner": "A" if quality(pair.group(1)) < quality(pair.group(2)) else "B"})
        return fair_judge(body)

    fake_openai.answer = serve(judge=contrary)
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    assert {r["reason"] for r in read(tmp_path / "prefs.rejected.jsonl")} == {prefs.CONTRADICTS} and stats.flips == 3


@pytest.mark.parametrize("policy, judge_score, reason", [
    (lambda body: ["OK: same answer."] * 4, None, prefs.IDENTICAL),
    (lambda body: ["OK:  same   answer.", "OK: same answer."], None, prefs.IDENTICAL),
    (policy_answers, 3, prefs.TIE),
])
def test_identical_answers_and_equal_scores_are_rejected_with_their_reason(tmp_path, records_file, fake_openai,
                                                                           policy, judge_score, reason):
    def judge(body):
        return fair_judge(body) if judge_score is None else json.dumps({"reason": "fine", "score": judge_score})

    fake_openai.answer = serve(policy=policy, judge=judge)
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    rejected = read(tmp_path / "prefs.rejected.jsonl")
    assert [r["reason"] for r in rejected] == [reason] * 3 and stats.rejected == {reason: 3}
    assert stats.ties == (3 if reason == prefs.TIE else 0) and not (tmp_path / "prefs.jsonl").exists()
    if reason == prefs.IDENTICAL:
        assert not [b for b in fake_openai.bodies if not is_policy(b)], "nothing to judge: the judge is not asked"


def test_cut_off_answers_never_compete(tmp_path, records_file, fake_openai):
    fake_openai.answer = serve()
    fake_openai.finish_reason = "length"
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    rejected = read(tmp_path / "prefs.rejected.jsonl")
    assert [r["reason"] for r in rejected] == [prefs.CUT_OFF] * 3 and stats.rejected == {prefs.CUT_OFF: 3}
    assert all(r["judge"]["dropped"] == {prefs.CUT_OFF: 4} for r in rejected)


def test_separate_requests_when_the_server_ignores_n(tmp_path, records_file, fake_openai):
    def one_each(body):  # seeds 42..45 stand for the four samples
        return policy_answers(body)[body["seed"] - 42]

    fake_openai.answer = serve(policy=one_each)
    prefs.run(config(tmp_path, records_file, fake_openai, use_n=False))
    sampled = [b for b in fake_openai.bodies if is_policy(b)]
    assert len(sampled) == 12 and {b["n"] for b in sampled} == {1} and {b["seed"] for b in sampled} == {42, 43, 44, 45}
    assert all(p["chosen"].startswith("GOOD") for p in load_pairs(tmp_path / "prefs.jsonl"))


def test_held_out_seed_tasks_are_never_sent(tmp_path, fake_openai):
    heldout = load_seed_split(SEEDS).heldout[0]
    in_path = write_jsonl(tmp_path / "in.jsonl", [RECORDS[1], {"id": "h", "instruction": heldout.instruction}])
    fake_openai.answer = serve()
    prefs.run(config(tmp_path, in_path, fake_openai))
    (rejected,) = read(tmp_path / "prefs.rejected.jsonl")
    assert rejected["reason"] == "eval_overlap" and rejected["heldout_seed"] == heldout.id
    assert not any(heldout.instruction in prompt_of(b) for b in fake_openai.bodies)


def test_labels_override_the_judge(tmp_path, records_file, fake_openai):
    fake_openai.answer = serve()
    prefs.run(config(tmp_path, records_file, fake_openai))
    by_id = {p["id"]: p for p in load_pairs(tmp_path / "prefs.jsonl")}
    labels = write_jsonl(tmp_path / "labels.jsonl", [
        make_label(by_id["t1"], "rejected", "chosen", "2026-01-01T00:00:00+00:00"),
        make_label(by_id["t2"], "tie", "rejected", "2026-01-01T00:00:00+00:00"),
        make_label(by_id["t3"], "chosen", "rejected", "2026-01-01T00:00:00+00:00"),
    ])
    asked = fake_openai.requests
    for _ in range(2):  # applying the same labels twice gives the same files
        stats = prefs.run(config(tmp_path, records_file, fake_openai, labels=str(labels)))
        pairs = {p["id"]: p for p in load_pairs(tmp_path / "prefs.jsonl")}
        assert set(pairs) == {"t1", "t3"} and fake_openai.requests == asked, "labels need no new request"
        assert pairs["t1"]["chosen"].startswith("BAD") and pairs["t1"]["label_source"] == "human"
        assert pairs["t1"]["judge_agreed"] is False and pairs["t1"]["margin"] == -4
        assert pairs["t3"]["chosen"].startswith("GOOD") and pairs["t3"]["judge_agreed"] is True
        assert [(r["id"], r["reason"]) for r in read(tmp_path / "prefs.rejected.jsonl")] == [("t2", "human_tie")]
        assert stats.labels == {"confirmed": 1, "overridden": 1, "dropped": 1, "stale": 0}


@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_pairs_load_with_datasets(tmp_path, records_file, fake_openai, fmt):
    import datasets

    fake_openai.answer = serve()
    prefs.run(config(tmp_path, records_file, fake_openai, format=fmt))
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "prefs.jsonl"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 3 and {"prompt", "chosen", "rejected", "id", "margin"} <= set(loaded.column_names)
    assert (loaded[0]["chosen"][0]["role"] == "assistant") if fmt == "messages" else loaded[0]["chosen"].startswith("GOOD")


def test_token_limit_counts_policy_and_judge_and_a_rerun_continues(tmp_path, records_file, fake_openai):
    fake_openai.answer = serve()
    stopped = prefs.run(config(tmp_path, records_file, fake_openai, concurrency=1, chunk_size=1, max_tokens_total=1000,
                               cache=False))
    assert stopped.stopped == "max_tokens_total" and 0 < stopped.written < 3
    rest = prefs.run(config(tmp_path, records_file, fake_openai, cache=False))
    assert rest.resumed == stopped.written and len(load_pairs(tmp_path / "prefs.jsonl")) == 3


def test_killed_run_resumes_exactly(tmp_path, fake_openai):
    fake_openai.answer = serve(policy=lambda body: ["GOOD: yes", "BAD: no", "OK: maybe"])
    fake_openai.latency = 0.02
    records = [{"id": f"k{i}", "instruction": f"Say the number {i}.", "input": ""} for i in range(24)]
    in_path = write_jsonl(tmp_path / "many.jsonl", records)
    out, rejected = tmp_path / "prefs.jsonl", tmp_path / "prefs.rejected.jsonl"
    command = [sys.executable, "-m", "pipeline", "prefs", "--in", str(in_path), "--out", str(out), "--backend", "openai",
               "--base-url", fake_openai.base_url, "--model", "policy", "--judge-model", "judge", "--num-samples", "3",
               "--no-cache", "--concurrency", "2", "--chunk-size", "2", "--seeds", str(SEEDS)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while len(read(out)) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(read(out)) + len(read(rejected))
    assert 4 <= before < 24, "the run must be killed part way"
    fake_openai.latency = 0
    stats = prefs.run(config(tmp_path, in_path, fake_openai, cache=False, num_samples=3))
    ids = [r["id"] for r in read(out) + read(rejected)]
    assert len(ids) == len(set(ids)) == 24 and set(ids) == {r["id"] for r in records}, "each exactly once"
    assert stats.resumed == before and not read(rejected)
    assert all(p["chosen"] == "GOOD: yes" and p["rejected"] == "BAD: no" for p in read(out))


def test_bad_input_is_one_line_with_exit_2(tmp_path):
    in_path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"id": "x", "input": "no instruction"}])
    result = subprocess.run([sys.executable, "-m", "pipeline", "prefs", "--in", str(in_path), "--out",
                             str(tmp_path / "p.jsonl"), "--seeds", str(SEEDS)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {in_path}:2: instruction: missing"
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "1"], "--num-samples: 1 is not at least 2"),
    (["--temperature", "0"], "--temperature: 0.0 is not more than 0"),
    (["--judge-backend", "vllm"], "invalid choice"),
])
def test_bad_flags_are_one_line_with_exit_2(tmp_path, records_file, flags, message):
    result = subprocess.run([sys.executable, "-m", "pipeline", "prefs", "--in", str(records_file), "--out",
                             str(tmp_path / "p.jsonl"), *flags], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("policy_on_server", [False, True], ids=["local-policy", "server-policy"])
def test_local_tiny_model_as_judge_and_policy(tmp_path, tiny_model_dir, fake_openai, policy_on_server):
    """Just that it runs: valid pairs, or rejections with a known reason. The random tiny model never
    stops, so as policy its answers are all cut off; as judge of the server's answers it scores and compares."""
    in_path = write_jsonl(tmp_path / "in.jsonl", [RECORDS[0], RECORDS[2]])
    out = tmp_path / "prefs.jsonl"
    fake_openai.answer = serve()
    policy = dict(backend="openai", base_url=fake_openai.base_url, model="policy") if policy_on_server else \
        dict(backend="local", model=str(tiny_model_dir))
    stats = prefs.run(prefs.Config(in_path=str(in_path), out=str(out), **policy, judge_backend="local",
                                   judge_model=str(tiny_model_dir), num_samples=2 + 2 * policy_on_server, max_tokens=8,
                                   device="cpu", cache=False, seeds=str(SEEDS)))
    pairs = load_pairs(out) if out.exists() else []
    rejected = read(tmp_path / "prefs.rejected.jsonl")
    assert len(pairs) + len(rejected) == 2 and stats.requests > 0
    assert all(r["reason"] in prefs.REASONS for r in rejected)
    assert all(p["models"]["judge"] == str(tiny_model_dir) and p["judge"]["scoring"] == "probs" for p in pairs)
    if policy_on_server:  # every answer reached the local judge: scored by probabilities, 1 to 5
        scores = [a["score"] for r in rejected for a in r["answers"]] + [s for p in pairs for s in p["scores"].values()]
        assert scores and all(1 <= s <= 5 for s in scores)
    else:
        assert [r["reason"] for r in rejected] == [prefs.CUT_OFF] * 2
    assert json.loads((tmp_path / "prefs.config.json").read_text())["config"]["judge_backend"] == "local"


def test_the_cache_answers_a_second_run(tmp_path, records_file, fake_openai):
    fake_openai.answer = serve()
    prefs.run(config(tmp_path, records_file, fake_openai))
    first = sorted(read(tmp_path / "prefs.jsonl"), key=lambda p: p["id"])
    asked = fake_openai.requests
    for name in ("prefs.jsonl", "prefs.config.json"):
        (tmp_path / name).unlink()
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    assert fake_openai.requests == asked and stats.cached == stats.requests == 3 + 3 * 4 + 3 * 2
    assert sorted(read(tmp_path / "prefs.jsonl"), key=lambda p: p["id"]) == first, "the same pairs (in completion order)"


def test_missing_labels_file_is_one_line_naming_the_flag(tmp_path, records_file, fake_openai):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=r"^--labels .*nope.jsonl: no such file"):
        prefs.run(config(tmp_path, records_file, fake_openai, labels=str(tmp_path / "nope.jsonl")))
    assert fake_openai.requests == 0 and not (tmp_path / "prefs.jsonl").exists()


def test_a_failed_judge_request_writes_nothing_for_its_instruction_and_a_rerun_asks_again(tmp_path, records_file,
                                                                                            fake_openai):
    from pipeline.errors import UserError

    fake_openai.answer = serve()
    fake_openai.faults = [None, None, None, "500"]  # the three policy requests pass; the first judge one fails
    with pytest.raises(UserError, match=r"1 instruction\(s\) had a request fail after all retries.*rerun the same command"):
        prefs.run(config(tmp_path, records_file, fake_openai, max_retries=0))
    written = read(tmp_path / "prefs.jsonl")
    assert len(written) == 2 and not read(tmp_path / "prefs.rejected.jsonl")
    stats = prefs.run(config(tmp_path, records_file, fake_openai))
    assert stats.resumed == 2 and stats.written == 1 and len(load_pairs(tmp_path / "prefs.jsonl")) == 3


def test_without_confirmation_the_pointwise_scores_alone_make_the_pair(tmp_path, records_file, fake_openai):
    # The embedded model always answers "A": its pairwise check would reject every pair as a flip,
    # so the demo asks the pointwise scores alone. The judge is then never shown two answers.
    fake_openai.answer = serve()
    stats = prefs.run(config(tmp_path, records_file, fake_openai, confirm=False))
    pairs = load_pairs(tmp_path / "prefs.jsonl")
    assert stats.written == 3 and not stats.rejected
    assert all(p["chosen"].startswith("GOOD") and p["rejected"].startswith("BAD") for p in pairs)
    assert all(p["judge"]["confirmed"] is False and "pairwise" not in p["judge"] for p in pairs)
    judged = [b for b in fake_openai.bodies if not is_policy(b)]
    assert len(judged) == 3 * 4 and not any(PAIRWISE.search(prompt_of(b)) for b in judged)
    card = (tmp_path / "prefs.card.md").read_text(encoding="utf-8")
    assert "prefs" in card and "pairwise confirmation" in card, "the pairs get a dataset card like respond's"
