"""`generate`: the stage end to end, on a fake client and against the fake OpenAI server over real HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.backends import Response
from pipeline.errors import UserError
from pipeline.generate import Config, run
from pipeline.jsonl import rejected_path_for
from pipeline.lang import language_of
from pipeline.similarity import rouge_l, tokenize
from tests.conftest import write_jsonl
from tests.fakes import FakeClient

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-test-generate-SECRET-3c2b1a"
SEEDS_EN = [
    "Give three tips for staying healthy.", "Translate the sentence into French.", "Write a haiku about the ocean.",
    "Classify the sentiment of the review as positive or negative.", "Explain what a black hole is to a child.",
    "Suggest a name for a bakery that sells only bread.", "Summarize the paragraph in one sentence.",
    "List the prime numbers between 10 and 30.",
]
SEEDS_JA = [
    "次の文を英語に翻訳してください。", "健康を保つための方法を三つ挙げてください。", "海についての俳句を作ってください。",
    "この文章を一文で要約してください。", "子どもにブラックホールを説明してください。", "新しいパン屋の名前を考えてください。",
    "十から三十までの素数を挙げてください。",
]
# Words for fake answers: random draws from this many are near-duplicates of nothing.
VOCABULARY = [f"{a}{b}" for a in ("ka", "to", "mi", "re", "su", "no", "ha", "yu", "be", "zo")
              for b in ("lan", "mor", "tix", "pud", "gev", "sar", "wok", "fen", "quo", "dri", "bel", "cun")]
VERBS = ("Describe", "Explain", "Compare", "Summarize", "Rewrite", "Classify", "Evaluate", "Outline")


def seeds_file(tmp_path: Path, english=SEEDS_EN, japanese=()) -> Path:
    records = [{"id": f"seed_task_{i}", "name": f"t{i}", "instruction": text,
                "instances": [{"input": "", "output": f"answer {i}"}], "is_classification": False}
               for i, text in enumerate(list(english) + list(japanese))]
    return write_jsonl(tmp_path / "seeds.jsonl", records)


def fresh_instruction(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)} the {' '.join(rng.sample(VOCABULARY, 6))} in detail."


def numbered_answer(rng: random.Random, first: int = 9, count: int = 4) -> str:
    return "Here are new tasks:\n" + "\n".join(f"{first + k}. {fresh_instruction(rng)}" for k in range(count))


def content_rng(request_text: str) -> random.Random:
    """Answers that depend only on the prompt: the same prompt gets the same answer."""
    return random.Random(hashlib.sha256(request_text.encode()).digest())


def prompt_of(request) -> str:
    return request.prompt if request.prompt is not None else request.messages[-1]["content"]


def config(tmp_path: Path, **overrides) -> Config:
    values = dict(out=str(tmp_path / "machine.jsonl"), num_instructions=12, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    if "seeds" not in values:
        values["seeds"] = str(seeds_file(tmp_path))
    return Config(**values)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_clean_pool(records: list[dict], n: int, threshold: float = 0.7) -> None:
    assert len(records) == n
    assert len({r["id"] for r in records}) == n
    assert len({r["instruction"] for r in records}) == n
    tokens = [tokenize(r["instruction"]) for r in records]
    worst = max(rouge_l(a, b) for i, a in enumerate(tokens) for b in tokens[:i])
    assert worst <= threshold


# ---------------------------------------------------------------- the stage on a fake client


def test_reaches_exactly_n_with_provenance_and_lazy_prompts(tmp_path):
    client = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request))))
    stats = run(config(tmp_path), client=client)
    records = read_lines(tmp_path / "machine.jsonl")
    assert_clean_pool(records, 12)
    assert (stats.accepted, stats.stopped) == (12, "done")
    assert [r["id"] for r in records] == [f"machine_{i:06d}" for i in range(12)]
    first = records[0]
    assert {"prompt_seed_ids", "prompt_machine_ids", "backend", "model", "request_id", "finish_reason", "usage",
            "time", "max_rouge_l", "most_similar"} <= first.keys()
    assert first["prompt_machine_ids"] == [] and len(first["prompt_seed_ids"]) == 8  # seeds fill in at first
    # Prompts are built when sent, from the pool as it is: later ones show 6 seeds and 2 machine instructions.
    later = records[-1]
    assert len(later["prompt_seed_ids"]) == 6 and len(later["prompt_machine_ids"]) == 2
    assert all(mid in {r["id"] for r in records} for mid in later["prompt_machine_ids"])
    # 3 answers of 4 candidates fill 12: the last answer's extra candidates are surplus, not written.
    assert stats.candidates == 4 * stats.requests
    assert (tmp_path / "machine.config.json").exists()


def test_requests_sample_fresh_and_are_reproducible_with_the_same_seed(tmp_path):
    def requests_of(seed):
        client = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request))))
        out = tmp_path / f"run{seed}-{len(list(tmp_path.iterdir()))}.jsonl"
        run(config(tmp_path, out=str(out), seed=seed, cache=False), client=client)
        return [(prompt_of(r), r.seed, r.temperature, r.top_p, r.max_tokens) for r in client.seen]

    first, again, other = requests_of(1), requests_of(1), requests_of(2)
    assert first == again
    assert first != other
    assert len({seed for _, seed, *_ in first}) == len(first)  # one sampling seed per request
    assert all(0.7 <= t <= 1.0 and 0 < p <= 1 and m > 0 for _, _, t, p, m in first)


def test_candidates_failing_the_filter_checks_are_rejected_with_reasons(tmp_path):
    answers = iter([
        "9. Draw a picture of a cat.\n10. Hi.\n11. Write a haiku about the ocean.\n12. Give three tips for staying healthy."
        "\n13. Describe the kalan tomor mitix in detail.\n14. Describe the kalan tomor mitix in more detail.",
    ])
    client = FakeClient(lambda request: next(answers, numbered_answer(content_rng(prompt_of(request)))))
    run(config(tmp_path, num_instructions=3), client=client)
    rejected = {r["instruction"]: r for r in read_lines(tmp_path / "machine.rejected.jsonl")}
    assert rejected["Draw a picture of a cat."]["reason"] == "blacklist"
    assert rejected["Hi."]["reason"] == "too_short"
    # A seed shown in the prompt is a repeated example; one not shown is caught as a seed copy.
    assert {rejected["Write a haiku about the ocean."]["reason"], rejected["Give three tips for staying healthy."]["reason"]} <= {
        "repeated_example", "seed_copy"}
    near = rejected["Describe the kalan tomor mitix in more detail."]
    assert near["reason"] == "near_duplicate" and near["max_rouge_l"] > 0.7
    assert near["most_similar"] == "machine_000000"
    assert {"max_rouge_l", "most_similar", "prompt_seed_ids", "request_index"} <= rejected["Hi."].keys()


def test_a_cut_off_answer_loses_its_last_item(tmp_path):
    client = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request))), finish_reason="length")
    run(config(tmp_path, num_instructions=6), client=client)
    reasons = [r["reason"] for r in read_lines(tmp_path / "machine.rejected.jsonl")]
    assert reasons.count("truncated") >= 2  # one per answer: 3 of 4 candidates per answer are usable


@pytest.mark.parametrize("mode, ending", [("self-instruct", "\n9."), ("alpaca", "\n4. Instruction:")])
def test_a_completions_request_ends_where_the_model_continues(tmp_path, mode, ending):
    client = FakeClient(lambda request: "")
    with pytest.raises(UserError, match="--max-requests"):
        run(config(tmp_path, mode=mode, api="completions", max_requests=2, cache=False), client=client)
    assert [r.prompt.endswith(ending) for r in client.seen] == [True, True], repr(client.seen[0].prompt[-20:])


def test_failed_requests_are_counted_and_the_run_goes_on(tmp_path):
    counter = iter(range(10_000))

    def answer(request):
        if next(counter) % 2 == 0:
            return Response(request=request, error="server error 500 after 5 retries")
        return numbered_answer(content_rng(prompt_of(request)))

    stats = run(config(tmp_path, num_instructions=8, cache=False), client=FakeClient(answer))
    assert stats.pool == 8 and stats.failed >= 2


def test_rerun_resumes_to_n_without_duplicate_ids_or_instructions(tmp_path):
    client = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request))))
    run(config(tmp_path, num_instructions=5), client=client)
    stats = run(config(tmp_path, num_instructions=11), client=client)
    assert (stats.resumed, stats.accepted) == (5, 6)
    assert_clean_pool(read_lines(tmp_path / "machine.jsonl"), 11)
    done = run(config(tmp_path, num_instructions=11), client=client)
    assert done.accepted == 0 and done.stopped == "done"


def test_a_cached_rerun_makes_no_new_requests(tmp_path):
    first = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request))))
    run(config(tmp_path), client=first)
    before = (tmp_path / "machine.jsonl").read_text(encoding="utf-8")
    (tmp_path / "machine.jsonl").unlink()
    rejected_path_for(tmp_path / "machine.jsonl").unlink(missing_ok=True)
    second = FakeClient(lambda request: pytest.fail("a cached request reached the model"))
    stats = run(config(tmp_path), client=second)
    assert second.seen == [] and stats.cached == stats.requests > 0
    after = read_lines(tmp_path / "machine.jsonl")
    assert [r["instruction"] for r in after] == [json.loads(line)["instruction"] for line in before.splitlines()]
    assert all(r["cached"] for r in after)


def test_japanese_seeds_give_accepted_japanese_instructions(tmp_path):
    def answer(request):
        rng = content_rng(prompt_of(request))
        items = ["".join(chr(0x4E00 + rng.randrange(4000)) for _ in range(10)) + "を説明して。" for _ in range(4)]
        return "以下が新しい依頼です。\n" + "\n".join(f"{9 + k}．{text}" for k, text in enumerate(items))

    client = FakeClient(answer)
    seeds = seeds_file(tmp_path, english=SEEDS_EN[:2], japanese=SEEDS_JA)
    run(config(tmp_path, seeds=str(seeds), language="ja", num_instructions=8), client=client)
    records = read_lines(tmp_path / "machine.jsonl")
    assert_clean_pool(records, 8)
    assert all(r["language"] == "ja" and r["instruction"].endswith("を説明して。") for r in records)
    japanese_ids = {f"seed_task_{i}" for i in range(2, 2 + len(SEEDS_JA))}
    assert all(set(r["prompt_seed_ids"]) <= japanese_ids for r in records)
    assert all("依頼" in prompt_of(request) for request in client.seen)  # the Japanese prompt text


def test_language_ja_keeps_japanese_requests_that_quote_english(tmp_path):
    # Issue 14: a Japanese request whose input is an English sentence is Japanese, not rejected
    # as wrong_language under --language ja.
    def answer(request):
        rng = content_rng(prompt_of(request))
        items = [f"次の英文を日本語に訳してください: The {' '.join(rng.sample(VOCABULARY, 14))} is here."
                 for _ in range(4)]
        return "\n".join(f"{9 + k}. {text}" for k, text in enumerate(items))

    client = FakeClient(answer)
    seeds = seeds_file(tmp_path, english=SEEDS_EN[:2], japanese=SEEDS_JA)
    stats = run(config(tmp_path, seeds=str(seeds), language="ja", num_instructions=4), client=client)
    records = read_lines(tmp_path / "machine.jsonl")
    assert len(records) == 4 and all(r["language"] == "ja" for r in records)
    assert stats.rejected.get("wrong_language", 0) == 0


def test_language_all_keeps_the_seeds_mix_and_a_missing_language_is_a_user_error(tmp_path):
    client = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request)), count=1))
    # 2 of 10 seeds are Japanese: requests pick Japanese with weight 0.2. Without the weights
    # (one language as likely as the other) the share would be 0.5; over 60 requests the
    # weighted share has standard deviation sqrt(0.2 * 0.8 / 60) = 0.052, so the window below is
    # over two of those either side of 0.2 and about four below 0.5.
    seeds = seeds_file(tmp_path, english=SEEDS_EN, japanese=SEEDS_JA[:2])
    assert len(SEEDS_EN) == 8
    run(config(tmp_path, seeds=str(seeds), num_instructions=60, cache=False), client=client)
    languages = [language_of(prompt_of(r)) for r in client.seen]
    share_ja = languages.count("ja") / len(languages)
    assert len(languages) >= 60 and 0.08 < share_ja < 0.32, share_ja
    with pytest.raises(UserError, match="--language ja: .* has no ja seed tasks"):
        run(config(tmp_path, out=str(tmp_path / "other.jsonl"), language="ja"), client=client)


def test_alpaca_mode_keeps_input_and_output(tmp_path):
    def answer(request):
        rng = content_rng(prompt_of(request))
        return "\n".join(f"###\n{n}. Instruction: {fresh_instruction(rng)}\n{n}. Input:\n<noinput>\n{n}. Output:\nanswer {n}"
                         for n in range(4, 10))

    client = FakeClient(answer)
    run(config(tmp_path, mode="alpaca", num_instructions=10), client=client)
    records = read_lines(tmp_path / "machine.jsonl")
    assert_clean_pool(records, 10)
    assert all(r["input"] == "" and r["output"].startswith("answer ") for r in records)
    assert prompt_of(client.seen[0]).count("###") == 3 + 1  # 3 seed tasks, then the asked-for ones
    assert "4 to 20" in prompt_of(client.seen[0])


def test_token_limit_and_dollar_budget_stop_cleanly(tmp_path):
    client = FakeClient(lambda request: numbered_answer(content_rng(prompt_of(request))))
    stats = run(config(tmp_path, num_instructions=100, max_tokens_total=100, cache=False), client=client)
    assert stats.stopped == "max_tokens_total" and 0 < stats.pool < 100 and stats.tokens >= 100
    stats = run(config(tmp_path, out=str(tmp_path / "b.jsonl"), num_instructions=100, price_per_1k=10.0, budget=1.0,
                       cache=False), client=client)
    assert stats.stopped == "budget" and stats.tokens >= 100


def test_a_model_whose_answers_are_all_rejected_stops_with_a_clear_error(tmp_path):
    client = FakeClient(lambda request: "9. Draw a map.\n10. Hi.")
    with pytest.raises(UserError, match="--max-requests: stopped after 7 requests with 0 of 12"):
        run(config(tmp_path, max_requests=7), client=client)
    assert len(client.seen) == 7


# A list with exact repeats (English and Japanese), a near repeat, and a text with no ROUGE-L
# tokens at all: the cases where generate's own exact-repeat check used to disagree with filter.
REPEATS = [
    "Describe the kalan tomor mitix in detail.", "Describe the kalan tomor mitix in detail.",
    "Describe the kalan tomor mitix in more detail.",
    "潮の満ち引きの仕組みを子どもにわかるように説明してください。", "潮の満ち引きの仕組みを子どもにわかるように説明してください。",
    "!!! ??? ...", "!!! ??? ...",
]


@pytest.mark.parametrize("threshold, heuristics", [(1.0, True), (1.0, False), (0.7, False), (0.7, True)])
def test_generate_keeps_exactly_what_filter_keeps_from_the_same_candidates(tmp_path, threshold, heuristics):
    from pipeline.filter import Config as FilterConfig
    from pipeline.filter import filter_instructions
    from pipeline.seeds import load_seeds

    seeds = seeds_file(tmp_path)
    kept, _, _ = filter_instructions([{"instruction": text} for text in REPEATS], load_seeds(seeds),
                                     FilterConfig(threshold=threshold, heuristics=heuristics))
    expected = [record["instruction"] for record in kept]
    answers = iter(["\n".join(f"{9 + k}. {text}" for k, text in enumerate(REPEATS))])
    client = FakeClient(lambda request: next(answers, ""))
    run(config(tmp_path, seeds=str(seeds), num_instructions=len(expected), threshold=threshold,
               heuristics=heuristics, max_requests=2, cache=False), client=client)
    assert [r["instruction"] for r in read_lines(tmp_path / "machine.jsonl")] == expected
    if threshold == 1.0:  # nothing scores above 1.0: exact repeats are kept by both stages
        assert expected.count(REPEATS[0]) == 2 and expected.count(REPEATS[3]) == 2
    else:
        assert expected.count(REPEATS[0]) == 1 and expected.count(REPEATS[3]) == 1


@pytest.mark.parametrize("overrides, flag", [
    ({"num_instructions": 0}, "--num-instructions"), ({"threshold": 1.5}, "--threshold"),
    ({"budget": 1.0}, "--budget"), ({"top_p": 0.0}, "--top-p"), ({"max_tokens": 0}, "--max-tokens"),
])
def test_bad_flags_name_themselves(tmp_path, overrides, flag):
    with pytest.raises(UserError, match=f"^{flag}"):
        config(tmp_path, **overrides)


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "machine.jsonl"
    with pytest.raises(UserError, match="no such file"):
        run(config(tmp_path, seeds=str(tmp_path / "missing.jsonl")), client=FakeClient(lambda r: ""))
    with pytest.raises(UserError, match="folder .* does not exist"):
        run(config(tmp_path, out=str(tmp_path / "nope" / "m.jsonl")), client=FakeClient(lambda r: ""))
    assert not out.exists()


def test_the_makefile_flags_are_accepted():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(
        "generate --seeds s.jsonl --out o.jsonl --num-instructions 20 --mode alpaca --language ja --threshold 0.6 "
        "--backend openai --model m --api completions --concurrency 4 --seed 7 --base-url http://x/v1 --no-cache".split())
    cfg = Config(**{k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__})
    assert (cfg.mode, cfg.language, cfg.threshold, cfg.api, cfg.base_url, cfg.cache) == (
        "alpaca", "ja", 0.6, "completions", "http://x/v1", False)


# ---------------------------------------------------------------- the openai backend over real HTTP


def diverse_server_answer(body: dict) -> str:
    rng = random.Random(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest() + os.urandom(4))
    return numbered_answer(rng, count=5)


def cli(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "generate", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_done_when_60_instructions_through_a_server_failing_one_request_in_four(tmp_path, fake_openai):
    fake_openai.answer = diverse_server_answer
    fake_openai.retry_after = "0"
    fake_openai.faults = [None, None, None, "429", None, None, None, "500", None, None, None, "malformed",
                          None, None, None, "drop"] * 10
    (tmp_path / "data").mkdir()
    seeds = seeds_file(tmp_path)
    proc = cli(["--seeds", str(seeds), "--backend", "openai", "--base-url", fake_openai.base_url, "--model", "fake-model",
                "--num-instructions", "60", "--timeout", "5"], cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    records = read_lines(tmp_path / "data" / "machine_instructions.jsonl")
    assert_clean_pool(records, 60)
    assert "60/60 instructions" in stdout
    assert fake_openai.requests >= 16  # so each of the four faults was served at least once
    assert all(a == f"Bearer {SECRET}" for a in fake_openai.authorizations)
    assert SECRET not in stdout and SECRET not in stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_exactly_n_valid_records(tmp_path, fake_openai):
    fake_openai.answer = diverse_server_answer
    fake_openai.latency = 0.05
    out = tmp_path / "machine.jsonl"
    args = ["--seeds", str(seeds_file(tmp_path)), "--out", str(out), "--backend", "openai", "--base-url",
            fake_openai.base_url, "--model", "fake-model", "--num-instructions", "40", "--concurrency", "2",
            "--cache-dir", str(tmp_path / "cache")]
    proc = cli(args, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = read_lines(out)
    killed_with = len(before)
    assert 8 <= killed_with < 40
    with open(out, "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"id": "machine_999999", "instruction": "half a rec')
    rerun = cli(args, cwd=tmp_path)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert "last line was cut off" in stderr
    records = read_lines(out)  # every line parses
    assert_clean_pool(records, 40)
    assert records[:killed_with] == before  # nothing written before the kill was lost or rewritten


def one_task_answer(body: dict) -> str:
    return numbered_answer(random.Random(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()), count=1)


def openai_config(tmp_path: Path, server, **overrides) -> Config:
    values = dict(backend="openai", base_url=server.base_url, model="fake-model", timeout=5.0, retry_base_delay=0.01,
                  cache=False)
    values.update(overrides)
    return config(tmp_path, **values)


def test_exactly_n_at_concurrency_against_a_server_failing_one_request_in_three(tmp_path, fake_openai):
    # One new task per answer, so the run needs about as many requests as instructions; with one
    # retry, a retried fault followed by a malformed body once drove the budget to -1 (a crash).
    fake_openai.answer = one_task_answer
    fake_openai.retry_after = "0"
    fake_openai.random_faults = (1 / 3, ("500", "malformed", "malformed", "drop", "429", "402"), 7)
    stats = run(openai_config(tmp_path, fake_openai, num_instructions=60, concurrency=16, max_retries=1,
                              max_requests=1000), client=None)
    assert_clean_pool(read_lines(tmp_path / "machine.jsonl"), 60)
    assert stats.stopped == "done" and stats.failed > 0 and stats.retries > 0
    # Every request the server saw is in the summary: sent = answered + failed + abandoned, plus
    # the retries; an abandoned request may also have been retried before it was cancelled.
    assert stats.sent == stats.requests + stats.abandoned
    assert stats.sent + stats.retries <= fake_openai.requests <= stats.sent + stats.retries + stats.abandoned


def test_a_rejected_request_is_recorded_once_and_never_sent_again(tmp_path, fake_openai):
    fake_openai.answer = one_task_answer
    fake_openai.faults = ["400"]
    # Credentials in the URL work, and are never shown or stored (issue 13, item 9).
    with_key = fake_openai.base_url.replace("http://", "http://bob:sk-in-url-SECRET@")
    run(openai_config(tmp_path, fake_openai, num_instructions=3, concurrency=1, base_url=with_key), client=None)
    [refused] = [r for r in read_lines(tmp_path / "machine.rejected.jsonl") if r["reason"] == "request_rejected"]
    shown = fake_openai.base_url.replace("http://", "http://[redacted]@")
    assert refused["error"] == f"request rejected at {shown} (400): This model's maximum context length was exceeded."
    saved = json.loads((tmp_path / "machine.config.json").read_text(encoding="utf-8"))
    assert saved["config"]["base_url"] == shown
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"sk-in-url-SECRET" in p.read_bytes()]
    run(openai_config(tmp_path, fake_openai, num_instructions=6, concurrency=1), client=None)
    records = read_lines(tmp_path / "machine.jsonl")
    assert_clean_pool(records, 6)
    indices = [r["request_index"] for r in records]
    assert refused["request_index"] not in indices and len(set(indices)) == 6
    assert [r["reason"] for r in read_lines(tmp_path / "machine.rejected.jsonl")].count("request_rejected") == 1


def test_the_token_limit_holds_at_high_concurrency(tmp_path, fake_openai, capsys):
    fake_openai.answer = one_task_answer
    fake_openai.latency = 0.05
    stats = run(openai_config(tmp_path, fake_openai, num_instructions=100, concurrency=64, max_tokens_total=500,
                              max_tokens=100), client=None)
    one_request = max(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
                      for r in read_lines(tmp_path / "machine.jsonl"))
    assert stats.stopped == "max_tokens_total" and 500 <= stats.tokens <= 500 + one_request
    assert fake_openai.peak_in_flight < 64 and stats.sent == fake_openai.requests
    summary = capsys.readouterr().out
    assert f"requests   {stats.sent} sent (" in summary and "--max-tokens-total reached" in summary
