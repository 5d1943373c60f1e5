"""pipeline/batch_api.py (`--batch-api`): the stages through the fake server's Batch API, over real HTTP."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from pipeline import generate, judge, respond
from pipeline.backends import BackendOptions, Request, open_client
from pipeline.batch_api import MAX_POLL_SECONDS, STATE_SUFFIX, state_path_for
from pipeline.errors import UserError
from pipeline.jsonl import path_beside
from tests.conftest import write_jsonl
from tests.test_generate import SECRET, assert_clean_pool, cli, diverse_server_answer, read_lines
from tests.test_generate import seeds_file as generate_seeds
from tests.test_judge import RECORDS as JUDGE_RECORDS
from tests.test_judge import fair_judge
from tests.test_respond import SEEDS as RESPOND_SEEDS
from tests.test_respond import smart_answer

FAST_POLL = 0.01  # seconds: the fake server's batches end after a few polls
# Provenance that differs between any two runs (live or batch): the server's ids.
RUN_FIELDS = ("request_id",)


def batch_options(server, tmp_path: Path, **overrides) -> dict:
    values = dict(backend="openai", base_url=server.base_url, model="fake-model", batch_api=True,
                  batch_poll_interval=FAST_POLL, cache_dir=str(tmp_path / "cache"), timeout=5.0)
    values.update(overrides)
    return values


def submitted(server) -> list[list[dict]]:
    """The input lines of every batch the server was asked to run, in creation order."""
    return [[json.loads(line) for line in server.files[b["input_file_id"]].decode("utf-8").splitlines()]
            for b in server.batches.values()]


def without_run_fields(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in RUN_FIELDS} for r in records]


# ---------------------------------------------------------------- the client


def test_japanese_text_round_trips_through_the_batch_files(tmp_path, fake_openai):
    fake_openai.answer = lambda body: "答え：" + body["messages"][-1]["content"]
    options = BackendOptions(**batch_options(fake_openai, tmp_path, cache=False))
    texts = ["日本の首都はどこですか？", "「吾輩は猫である」の作者は？", "絵文字も😀大丈夫？"]
    client = open_client(options)
    try:
        responses = list(client.stream(Request(key=f"k{i}", messages=({"role": "user", "content": t},))
                                       for i, t in enumerate(texts)))
    finally:
        client.close()
    assert sorted(r.texts[0] for r in responses) == sorted("答え：" + t for t in texts)
    assert all(r.error is None and r.request_id.startswith("chatcmpl-") for r in responses)
    (lines,) = submitted(fake_openai)
    raw = next(iter(fake_openai.files.values())).decode("utf-8")
    assert "日本の首都はどこですか？" in raw  # written as UTF-8, not \u escapes
    assert [line["body"]["messages"][0]["content"] for line in lines] == texts
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert next(iter(fake_openai.batches.values()))["completion_window"] == "24h"


def test_failed_and_refused_lines_become_failures_and_rejections(tmp_path, fake_openai):
    fake_openai.faults = ["422", "500", "drop", None]
    client = open_client(BackendOptions(**batch_options(fake_openai, tmp_path, cache=False, concurrency=4)))
    try:
        responses = list(client.stream(Request(key=f"k{i}", prompt=f"question {i}") for i in range(4)))
    finally:
        client.close()
    by_key = {r.request.key: r for r in responses}
    assert by_key["k0"].rejected and "(422)" in by_key["k0"].error and "safety system" in by_key["k0"].error
    assert not by_key["k1"].rejected and "HTTP 500" in by_key["k1"].error
    assert not by_key["k2"].rejected and "server_error" in by_key["k2"].error
    assert by_key["k3"].texts == ["answer to: question 3"]
    batch_id = next(iter(fake_openai.batches))
    assert all(batch_id in by_key[k].error for k in ("k0", "k1", "k2"))
    assert (client.totals.rejected, client.totals.failures, client.totals.answered) == (1, 2, 1)


def test_identical_requests_are_sent_once_and_share_the_answer(tmp_path, fake_openai):
    client = open_client(BackendOptions(**batch_options(fake_openai, tmp_path, cache=False, concurrency=8)))
    try:
        responses = list(client.stream([Request(key="a", prompt="same"), Request(key="b", prompt="same"),
                                        Request(key="c", prompt="other")]))
    finally:
        client.close()
    assert [r.request.key for r in responses] == ["a", "b", "c"]
    assert responses[0].texts == responses[1].texts == ["answer to: same"]
    assert len(submitted(fake_openai)[0]) == 2


@pytest.mark.parametrize("outcome", ["failed", "expired", "cancelled"])
def test_a_batch_that_ends_badly_is_one_line_naming_it(tmp_path, fake_openai, outcome):
    fake_openai.batch_outcome = outcome
    cfg = respond_config(tmp_path, fake_openai)
    with pytest.raises(UserError) as caught:
        respond.run(cfg)
    (batch_id,) = fake_openai.batches
    message = str(caught.value)
    assert batch_id in message and outcome in message and "\n" not in message
    assert not state_path_for(cfg.out).exists()  # a rerun submits anew instead of waiting on a dead batch


def test_the_local_backend_refuses_batch_api():
    with pytest.raises(UserError, match="^--batch-api: needs --backend openai"):
        BackendOptions(batch_api=True)


def test_a_server_without_the_batch_api_is_one_line(tmp_path, fake_openai):
    options = BackendOptions(**batch_options(fake_openai, tmp_path, cache=False,
                                             base_url=fake_openai.base_url.replace("/v1", "/nothing")))
    client = open_client(options)
    try:
        with pytest.raises(UserError, match="does not offer the Batch API"):
            list(client.stream([Request(key="k", prompt="hi")]))
    finally:
        client.close()


def test_the_poll_interval_doubles_up_to_its_cap(tmp_path, fake_openai, monkeypatch):
    waits = []
    monkeypatch.setattr("pipeline.batch_api.time.sleep", waits.append)  # the waits, not the clock, are under test
    fake_openai.batch_steps = ("validating",) + ("in_progress",) * 9
    client = open_client(BackendOptions(**batch_options(fake_openai, tmp_path, cache=False, batch_poll_interval=8.0)))
    try:
        list(client.stream([Request(key="k", prompt="hi")]))
    finally:
        client.close()
    assert waits == [8.0, 16.0, 32.0] + [MAX_POLL_SECONDS] * 6  # one wait after each of the 9 polls before the end


# ---------------------------------------------------------------- the stages


def test_generate_with_batch_api_reaches_exactly_n(tmp_path, fake_openai):
    fake_openai.answer = diverse_server_answer
    cfg = generate.Config(seeds=str(generate_seeds(tmp_path)), out=str(tmp_path / "machine.jsonl"),
                          num_instructions=30, **batch_options(fake_openai, tmp_path, concurrency=4))
    stats = generate.run(cfg)
    records = read_lines(tmp_path / "machine.jsonl")
    assert_clean_pool(records, 30)
    assert stats.stopped == "done"
    batches = submitted(fake_openai)
    assert len(batches) >= 2 and all(len(lines) <= 4 for lines in batches)  # chunks of --concurrency
    # Later chunks were built from the grown pool: some prompt shows an accepted instruction.
    assert any(r["prompt_machine_ids"] for r in records)
    assert fake_openai.requests == sum(len(lines) for lines in batches)  # nothing went through the live endpoint
    assert not state_path_for(cfg.out).exists()


def respond_config(tmp_path: Path, server, **overrides) -> respond.Config:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", RESPOND_SEEDS)
    tasks = [{"id": f"t{i}", "instruction": text} for i, text in enumerate(
        ["Classify the sentiment of this tweet.", "Write a poem about autumn.", "Is this email spam?",
         "次の文を丁寧な日本語に書き換えてください。", "Explain photosynthesis briefly."])]
    in_path = write_jsonl(tmp_path / "filtered.jsonl", tasks)
    values = dict(in_path=str(in_path), seeds=str(seeds), out=str(tmp_path / "alpaca.jsonl"))
    values.update(batch_options(server, tmp_path, concurrency=3, cache=False, **overrides))
    return respond.Config(**values)


def test_respond_with_batch_api_writes_what_live_mode_writes(tmp_path, fake_openai):
    fake_openai.answer = smart_answer
    respond.run(respond_config(tmp_path, fake_openai, out=str(tmp_path / "live.jsonl"), batch_api=False))
    live_requests = fake_openai.requests
    respond.run(respond_config(tmp_path, fake_openai, out=str(tmp_path / "batch.jsonl")))
    live, batch = read_lines(tmp_path / "live.jsonl"), read_lines(tmp_path / "batch.jsonl")
    assert len(batch) == 5 and any("日本語" in r["instruction"] for r in batch)
    key = lambda r: r["id"]  # noqa: E731 -- completion order differs; the records must not
    assert without_run_fields(sorted(batch, key=key)) == without_run_fields(sorted(live, key=key))
    assert fake_openai.requests == 2 * live_requests  # the same requests, once each way
    assert fake_openai.batch_creations >= 2  # the decisions, then the answers, in chunks of 3


def test_judge_with_batch_api_scores_every_record(tmp_path, fake_openai):
    fake_openai.answer = fair_judge
    in_path = write_jsonl(tmp_path / "alpaca.jsonl", JUDGE_RECORDS)
    judge.run(judge.Config(in_path=str(in_path), out=str(tmp_path / "judged.jsonl"),
                           **batch_options(fake_openai, tmp_path, concurrency=8)))
    scores = {r["id"]: r["judge"]["score"] for r in read_lines(tmp_path / "judged.jsonl")}
    assert scores == {"r1": 5, "r2": 1, "r3": 5, "r4": 1, "r5": 5}
    assert fake_openai.batch_creations == 1
    assert all(line["body"]["response_format"]["type"] == "json_schema" for line in submitted(fake_openai)[0])


@pytest.mark.parametrize("stage", ["generate", "respond", "judge"])
def test_every_model_stage_has_the_flag(stage):
    from pipeline.cli import build_parser

    args = build_parser().parse_args([stage, "--backend", "openai", "--batch-api"])
    assert args.batch_api is True
    assert build_parser().parse_args([stage]).batch_api is False


# ---------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_while_polling_then_rerun_picks_the_same_batch_up(tmp_path, fake_openai):
    fake_openai.answer = diverse_server_answer
    fake_openai.batch_hold = True  # the first batch stays in progress until the run is killed
    fake_openai.batch_steps = ()  # then every batch ends at its first poll: the CLI polls every 5 s at first
    out = tmp_path / "machine.jsonl"
    args = ["--seeds", str(generate_seeds(tmp_path)), "--out", str(out), "--backend", "openai", "--base-url",
            fake_openai.base_url, "--model", "fake-model", "--num-instructions", "25", "--concurrency", "4",
            "--batch-api", "--cache-dir", str(tmp_path / "cache")]
    state = path_beside(out, STATE_SUFFIX)
    proc = cli(args, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and fake_openai.batch_polls < 1:  # submitted, polled, now waiting
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    (first_batch,) = fake_openai.batches
    kept = json.loads(state.read_text(encoding="utf-8"))
    assert [b["id"] for b in kept["batches"]] == [first_batch]
    assert SECRET not in state.read_text(encoding="utf-8")
    fake_openai.batch_hold = False
    rerun = cli(args, cwd=tmp_path)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert f"batch {first_batch}: picked up again" in stderr
    assert fake_openai.batches[first_batch]["status"] == "completed"
    ids = [line["custom_id"] for lines in submitted(fake_openai) for line in lines]
    assert len(ids) == len(set(ids))  # no request was ever submitted twice
    assert_clean_pool(read_lines(out), 25)
    assert not state.exists()
    assert SECRET not in stdout + stderr


def test_a_kept_batch_that_no_request_matches_stays_and_is_named(tmp_path, fake_openai, capsys):
    state = tmp_path / "out.batch.json"
    state.write_text(json.dumps({"format": 1, "batches": [
        {"id": "batch_from_before", "input_file_id": "file-x", "custom_ids": ["0" * 32]}]}), encoding="utf-8")
    from pipeline.batch_api import BatchClient

    client = BatchClient(BackendOptions(**batch_options(fake_openai, tmp_path, cache=False)), state)
    try:
        (response,) = client.stream([Request(key="k", prompt="新しい質問")])
    finally:
        client.close()
    assert response.texts == ["answer to: 新しい質問"]
    assert [b["id"] for b in json.loads(state.read_text(encoding="utf-8"))["batches"]] == ["batch_from_before"]
    assert "keeps batch batch_from_before from an earlier run" in capsys.readouterr().err


def test_a_damaged_state_file_is_one_line_naming_it(tmp_path, fake_openai):
    out = tmp_path / "alpaca.jsonl"
    state = state_path_for(out)
    state.write_text('{"format": 1, "batches": [{"id": ', encoding="utf-8")  # cut off mid-write by hand
    with pytest.raises(UserError, match=f"^{state}: not a batch state file .*delete it"):
        open_client(respond_config(tmp_path, fake_openai, out=str(out)))


def test_a_rerun_with_more_requests_per_batch_waits_for_the_kept_one_and_submits_only_the_rest(tmp_path, fake_openai):
    from pipeline.batch_api import BatchClient

    state = tmp_path / "out.batch.json"
    requests = [Request(key=f"k{i}", prompt=f"質問 {i}") for i in range(6)]
    first = BatchClient(BackendOptions(**batch_options(fake_openai, tmp_path, cache=False, concurrency=4)), state)
    try:  # what a run killed while polling leaves: a submitted batch of the first 4, kept in the state file
        first.state.add(first._submit([(first.custom_id(r), r) for r in requests[:4]]))
    finally:
        first.close()
    (kept_batch,) = fake_openai.batches
    rerun = BatchClient(BackendOptions(**batch_options(fake_openai, tmp_path, cache=False, concurrency=6)), state)
    try:
        responses = list(rerun.stream(requests))
    finally:
        rerun.close()
    assert [r.texts for r in responses] == [[f"answer to: 質問 {i}"] for i in range(6)]
    assert [len(lines) for lines in submitted(fake_openai)] == [4, 2]
    assert fake_openai.batches[kept_batch]["status"] == "completed" and not state.exists()


@pytest.mark.slow
def test_a_stop_signal_while_polling_keeps_the_batch_and_says_so(tmp_path, fake_openai):
    fake_openai.batch_hold = True
    out = tmp_path / "machine.jsonl"
    proc = cli(["--seeds", str(generate_seeds(tmp_path)), "--out", str(out), "--backend", "openai", "--base-url",
                fake_openai.base_url, "--model", "fake-model", "--num-instructions", "5", "--batch-api",
                "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and fake_openai.batch_polls < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    (batch_id,) = fake_openai.batches
    assert f"batch {batch_id}: still running" in stderr and "picks it up again" in stderr
    assert [b["id"] for b in json.loads(path_beside(out, STATE_SUFFIX).read_text(encoding="utf-8"))["batches"]] == [batch_id]
    assert "Traceback" not in stderr
