"""Preference pairs for DPO: K answers from the policy, a judge picks the best and the worst.

    python -m pipeline prefs --in data/alpaca_data.jsonl --out data/preferences.jsonl \\
        --backend local --model runs/sft --num-samples 4 \\
        [--judge-backend openai --judge-model gpt-4o-mini --judge-base-url URL] \\
        [--labels data/preferences.labels.jsonl] [--format alpaca|messages]

(or `make prefs`). What SFT cannot learn is that one answer is better than another; these
pairs say so. For each distinct (instruction, input) of `--in`:

1. K answers (`--num-samples`) from the policy, sampled at `--temperature` (above 0, so they
   differ): one request with n=K, or K requests with seeds seed+k (`--no-use-n`, for servers
   that ignore n). Answers cut off at `--max-tokens` and empty ones never compete (a cut-off
   answer is not a worse answer, only a shorter budget), and identical answers count once.
2. The judge scores each answer, pointwise (`pipeline/judging.py`: a JSON score with
   `--scoring text`, the G-Eval expectation over the digit probabilities with `probs`).
3. The best and the worst by score (the first of equal ones) go to the judge side by side,
   in both orders; the pair is kept only when both orders prefer the pointwise best.
4. The pair goes to `--out` (`pipeline/preferences.py`'s record: TRL's `prompt` / `chosen` /
   `rejected`, standard or conversational with `--format messages`, plus id, instruction,
   input, scores, margin, the judge's reasons, models, `label_source: judge`). Otherwise one
   line goes to `<out stem>.rejected.jsonl` with its `reason`:
   `cut_off` / `empty_answer` / `identical_answers` (fewer than two usable, distinct answers),
   `tie` (best and worst scored the same), `flip` (the pairwise verdict changed with the order:
   position bias), `pairwise_tie` (the judge called them equal), `contradicts_pointwise` (both
   orders preferred the pointwise worst), `judge_unparsed` (a judge reply could not be read, after
   the one re-ask), `request_rejected` (the server refused the policy request: 400/422) and
   `eval_overlap` (the instruction is, or is too close to, a held-out seed task: eval's unseen
   tasks are never sent to the policy or the judge, nor trained on).

Input: respond's records (`data/alpaca_data.jsonl`, the default: each instruction with the
input respond wrote for it; `messages` records too, whose first user turn is the instruction)
or bare instructions (`data/filtered_instructions.jsonl`). A record without `input` is
answered without one: writing inputs is respond's job, so run it first for tasks that need
one. Each pair's `id` is its record's `id` (respond's `<instruction id>-<k>`), or a hash of the
instruction and input for a record without one; records with the same instruction and input
count once.

The judge defaults to the policy itself (a self-rewarding model, Yuan et al. 2024: one model
in memory on the local backend); a stronger judge behind `--judge-backend openai` gives better
pairs. `--max-tokens-total` / `--budget` count the policy's and the judge's tokens together.

Resuming: the work goes in chunks of `--chunk-size` instructions, each sampled, scored and
compared, then written one line per instruction; a rerun skips every id found in either
output file. So after `kill -9` no pair is written twice or lost, and the answers the killed
chunk had received are in the request cache, so the rerun does not pay for them again. A
request that fails after all retries is written nowhere: the next run asks again.

`--labels FILE` (what `python -m pipeline label` writes) makes a person's choices override the
judge's (`label_source: human`; `preferences.apply_labels`); a pair a person called a tie moves
to the rejected file with reason `human_tie`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from pipeline import cards, judging
from pipeline.backends import BackendOptions, Request, open_client
from pipeline.config import option, write_resolved_config
from pipeline.errors import InputError, UserError
from pipeline.jsonl import (INSTRUCTION_FIELDS, AppendLog, check_fields, check_output_path, claim_outputs,
                            config_path_for, load_records, locked_outputs, rejected_path_for, removed_if_unused,
                            write_jsonl_atomic)
from pipeline.limits import token_limit
from pipeline.preferences import HUMAN_TIE, apply_labels, check_label, make_pair, pair_format
from pipeline.seeds import EVAL_OVERLAP, HeldoutGuard, load_seed_split
from pipeline.similarity import NEAR_DUPLICATE_THRESHOLD, THRESHOLD_BOUNDS
from pipeline.templates import alpaca_prompt, user_text

# The policy's sampling temperature: high enough that K answers differ (so there is something to
# prefer), low enough that a small SFT model stays on the task.
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_P = 0.95
DEFAULT_POLICY = "runs/sft"  # what `make finetune` writes: DPO starts from the SFT model
DEFAULT_CHUNK = 32  # instructions per chunk: the most work a kill -9 can leave unwritten
KEY_CHARS = 16  # hex digits of the SHA-256 id of a record without one

CUT_OFF, EMPTY, IDENTICAL = "cut_off", "empty_answer", "identical_answers"
TIE, FLIP, PAIRWISE_TIE, CONTRADICTS = "tie", "flip", "pairwise_tie", "contradicts_pointwise"
UNPARSED, REQUEST_REJECTED = "judge_unparsed", "request_rejected"
REASONS = (CUT_OFF, EMPTY, IDENTICAL, TIE, FLIP, PAIRWISE_TIE, CONTRADICTS, UNPARSED, REQUEST_REJECTED,
           EVAL_OVERLAP, HUMAN_TIE)
TIES, FLIPS = (TIE, PAIRWISE_TIE), (FLIP, CONTRADICTS)  # the summary's two headline counts
# Margin histogram: one bucket per score step, up to the widest margin the 1-5 scale allows.
MARGIN_BUCKETS = tuple(range(1, judging.SCORE_MAX - judging.SCORE_MIN + 1))
BAR_WIDTH = 40  # characters of the longest histogram bar in the summary
SCORE_DIGITS = 4  # probability scores and margins are rounded here: finer is noise


@dataclass(frozen=True)
class Config(BackendOptions):
    in_path: str = option("data/alpaca_data.jsonl", "instructions with their inputs: respond's records (alpaca or "
                                                    "messages), or bare instructions (answered without input)",
                          flag="--in")
    out: str = option("data/preferences.jsonl", "preference pairs (TRL's prompt/chosen/rejected), appended as made")
    model: str = option(DEFAULT_POLICY, "the policy: a local model folder (the SFT run by default) or a server's model")
    format: Literal["alpaca", "messages"] = option(
        "alpaca", "alpaca: prompt/chosen/rejected as text (TRL's standard form); messages: conversational form")
    num_samples: int = option(4, "answers sampled per instruction; the best and the worst by the judge make the pair",
                              min=2)
    temperature: float = option(SAMPLE_TEMPERATURE, "policy sampling temperature (above 0: the answers must differ)",
                                above=0)
    top_p: float = option(SAMPLE_TOP_P, "policy nucleus sampling", above=0, max=1)
    max_tokens: int = option(256, "most tokens per answer; an answer cut there never enters a pair", min=1)
    use_n: bool = option(True, "ask for the K answers in one request with n=K (--no-use-n: K requests, seed+k each, "
                               "for servers that ignore n)")
    judge_backend: str | None = option(None, "the judge's backend (default: --backend)", choices=("local", "openai"))
    judge_model: str | None = option(None, "the judge model (default: --model, the policy judging itself)")
    judge_base_url: str | None = option(None, "the judge's server URL (default: --base-url)")
    scoring: Literal["auto", "text", "probs"] = option(
        "auto", "probs: expectation over the digit tokens' probabilities (G-Eval); text: a JSON score and reason; "
                "auto: probs on a local judge, text on openai", choices=("auto", "text", "probs"))
    structured: bool = option(True, "text scoring: ask for JSON with response_format json_schema "
                                    "(--no-structured for a server that refuses it)")
    rubric: str | None = option(None, "pointwise rubric file replacing the built-in ones; slots {question}, {answer}")
    pairwise_rubric: str | None = option(None, "pairwise rubric file; slots {question}, {answer_a}, {answer_b}")
    confirm: bool = option(True, "confirm the best against the worst with the pairwise verdict in both orders "
                                 "(--no-confirm: the pointwise scores alone decide, for a judge too small to "
                                 "compare two answers, such as the embedded model, which always answers 'A')")
    judge_max_tokens: int = option(256, "most tokens of a judge's text reply (reason and verdict)", min=1)
    labels: str | None = option(None, "a person's choices (what `label` writes): they override the judge's")
    seeds: str = option("seeds/seed_tasks.jsonl", "seed file whose held-out tasks (eval's unseen ones) are kept out")
    threshold: float = option(NEAR_DUPLICATE_THRESHOLD, "an instruction whose ROUGE-L F1 against a held-out seed "
                                                        "task is above this is kept out (eval_overlap)",
                              **THRESHOLD_BOUNDS)
    chunk_size: int = option(DEFAULT_CHUNK, "instructions sampled, judged and written together; a kill loses at most "
                                            "one chunk's unwritten work (its answers stay in the cache)", min=1)
    limit: int | None = option(None, "make pairs for the first N instructions only", min=1)

    def judge_options(self) -> BackendOptions:
        backend = self.judge_backend or self.backend
        same_place = backend == self.backend
        return BackendOptions.of(self, backend=backend, model=self.judge_model or self.model,
                                 base_url=self.judge_base_url or (self.base_url if same_place else None),
                                 batch_api=self.batch_api and backend == "openai")

    def settings(self) -> judging.JudgeSettings:
        scoring = judging.resolve_scoring(self.scoring, self.judge_backend or self.backend)
        # The judge's own temperature is 0 (a judgement, not a creative answer): JudgeSettings' default.
        return judging.JudgeSettings(scoring=scoring, structured=self.structured, max_tokens=self.judge_max_tokens,
                                     seed=self.seed, rubric=self.rubric, pairwise_rubric=self.pairwise_rubric)


@dataclass
class Stats:
    instructions: int = 0  # distinct (instruction, input) in --in
    resumed: int = 0  # settled in an earlier run
    written: int = 0  # pairs written this run
    rejected: dict[str, int] = field(default_factory=dict)  # this run, by reason
    ties: int = 0
    flips: int = 0
    failed: int = 0  # a request failed after all retries: the next run asks again
    last_error: str = ""
    pairs_total: int = 0  # pairs in --out at the end
    margin_histogram: dict[str, int] = field(default_factory=dict)  # every pair in --out
    labels: dict[str, int] = field(default_factory=dict)  # --labels: confirmed, overridden, dropped, stale
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""  # the spending limit that ended the run early


@dataclass(frozen=True)
class Task:
    id: str
    instruction: str
    input: str


@dataclass
class Work:
    """One task through a chunk: its usable answers, their judgements, and what was dropped."""

    task: Task
    answers: list[str] = field(default_factory=list)
    judgements: dict[int, judging.Judgement] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    done: bool = False  # written to one of the files, or failed (asked again next run)


# ---------------------------------------------------------------- reading the input


def task_parts(record: dict, path, line: int) -> tuple[str, str]:
    """(instruction, input) of an instruction, Alpaca or messages record."""
    if "messages" not in record:
        check_fields(record, INSTRUCTION_FIELDS, path, line)
        return record["instruction"].strip(), (record.get("input") or "").strip()
    turns = record["messages"]
    user = next((t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "user"), None) \
        if isinstance(turns, list) else None
    if not isinstance(user, str) or not user.strip():
        raise InputError(path, line, "messages", "expected a list of turns with a non-empty user turn")
    return user.strip(), ""


def load_tasks(path, limit: int | None) -> list[Task]:
    """Every distinct (instruction, input), validated before anything is written."""
    tasks: list[Task] = []
    ids: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()

    def validate(record: dict, line: int) -> None:
        instruction, given = task_parts(record, path, line)
        if (instruction, given) in seen:
            return
        seen.add((instruction, given))
        digest = hashlib.sha256(json.dumps([instruction, given], ensure_ascii=False).encode("utf-8")).hexdigest()
        task_id = str(record["id"]) if record.get("id") is not None else f"p-{digest[:KEY_CHARS]}"
        if task_id in ids:
            raise InputError(path, line, "id",
                             f"{task_id!r} is also the id of line {ids[task_id]} (pairs are keyed on it)")
        ids[task_id] = line
        tasks.append(Task(task_id, instruction, given))

    load_records(path, validate=validate)
    return tasks[:limit] if limit is not None else tasks


def settled_ids(records: list[dict], path: Path, fmt: str | None) -> set[str]:
    """Ids already in an output file; a file another stage wrote (or another --format) is refused."""
    for line, record in enumerate(records, start=1):
        if not isinstance(record.get("id"), str) or ("reason" not in record and "chosen" not in record):
            raise InputError(path, line, "id", "missing: this file was not written by `prefs`; use another --out")
        if fmt is not None and pair_format(record) != fmt:
            raise UserError(f"--out {path}: holds {pair_format(record)} pairs; --format {fmt} would mix two formats "
                            "in one file (use another --out, or the same --format to resume)")
    return {record["id"] for record in records}


def split_heldout(tasks: list[Task], cfg: Config) -> tuple[list[Task], list[tuple[Task, str]]]:
    """(tasks to work on, tasks too close to a held-out seed task with that task's id)."""
    heldout = load_seed_split(cfg.seeds).heldout
    guard = HeldoutGuard(heldout, cfg.threshold)
    kept, out = [], []
    for task, match in zip(tasks, guard.overlaps([t.instruction for t in tasks])):
        (kept.append(task) if match is None else out.append((task, match[1].id)))
    return kept, out


# ---------------------------------------------------------------- one chunk: sample, score, compare


def policy_requests(tasks: list[Task], cfg: Config) -> Iterator[Request]:
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    for task in tasks:
        record = {"instruction": task.instruction, "input": task.input}
        # Chat models get the user turn finetune trains on; a base model on completions the Alpaca prompt.
        text = dict(messages=({"role": "user", "content": user_text(record)},)) if cfg.api == "chat" \
            else dict(prompt=alpaca_prompt(record))
        if cfg.use_n:
            yield Request(key=f"{task.id}\x00n", n=cfg.num_samples, seed=cfg.seed, **text, **sampling)
            continue
        for k in range(cfg.num_samples):
            yield Request(key=f"{task.id}\x00{k}", seed=None if cfg.seed is None else cfg.seed + k, **text, **sampling)


def fold(text: str) -> str:
    """What makes two answers the same: whitespace does not."""
    return " ".join(text.split())


def usable(samples: list[tuple[str, str]], work: Work) -> None:
    """Keep the finished, non-empty, distinct answers; count the rest by why they were dropped."""
    seen: set[str] = set()
    for text, finish in samples:
        if finish == "length":
            work.dropped[CUT_OFF] += 1
        elif not text.strip():
            work.dropped[EMPTY] += 1
        elif fold(text) in seen:
            work.dropped[IDENTICAL] += 1
        else:
            seen.add(fold(text))
            work.answers.append(text.strip())


def too_few_reason(work: Work) -> str:
    """Why fewer than two answers could compete: duplicates first (the policy had nothing else to say)."""
    for reason in (IDENTICAL, CUT_OFF, EMPTY):
        if work.dropped[reason]:
            return reason
    return EMPTY


def best_and_worst(work: Work) -> tuple[int, int]:
    """Indices of the highest- and lowest-scored answers; the first of equal ones, so reruns agree."""
    scored = [(j.score, i) for i, j in work.judgements.items() if j.score is not None]
    best = min(scored, key=lambda s: (-s[0], s[1]))[1]
    worst = min(scored, key=lambda s: (s[0], s[1]))[1]
    return best, worst


class Chunk:
    """Takes a chunk of tasks through the three steps; writes each task's one line as soon as it is decided."""

    def __init__(self, tasks: list[Task], cfg: Config, writer: "Writer"):
        self.cfg, self.writer = cfg, writer
        self.work = {task.id: Work(task) for task in tasks}

    def sample(self, policy) -> None:
        answers: dict[str, list[tuple[str, str]]] = {task_id: [] for task_id in self.work}
        expected = 1 if self.cfg.use_n else self.cfg.num_samples
        replies = Counter()
        for response in policy.stream(policy_requests([w.task for w in self.work.values()], self.cfg)):
            work = self.work[response.request.key.split("\x00")[0]]
            replies[work.task.id] += 1
            if work.done:
                continue
            if response.error is not None or not response.texts:
                if response.rejected:
                    self.writer.reject(work, REQUEST_REJECTED, error=response.error)
                else:
                    self.writer.fail(work, response.error or "an answer without text")
                continue
            finishes = response.finish_reasons or ["stop"] * len(response.texts)
            answers[work.task.id] += list(zip(response.texts, finishes))
        for task_id, work in self.work.items():
            if work.done or replies[task_id] < expected:  # a spending limit ended the stream first
                work.done = work.done or replies[task_id] < expected
                continue
            usable(answers[task_id], work)
            if len(work.answers) < 2:
                self.writer.reject(work, too_few_reason(work))

    def score(self, judge, settings: judging.JudgeSettings) -> None:
        items = [judging.JudgeItem(f"{w.task.id}\x00{i}", w.task.instruction, answer, w.task.input)
                 for w in self.work.values() if not w.done for i, answer in enumerate(w.answers)]
        for item, judgement in judging.judge_items(judge, items, settings):
            task_id, index = item.key.rsplit("\x00", 1)
            work = self.work[task_id]
            if judgement.error is not None and not work.done:
                self.writer.fail(work, judgement.error)
            work.judgements[int(index)] = judgement
        for work in self.work.values():
            if work.done:
                continue
            if len(work.judgements) < len(work.answers):  # a spending limit ended the stream first
                work.done = True
                continue
            unparsed = sum(j.unparsed for j in work.judgements.values())
            if unparsed:
                work.dropped[UNPARSED] += unparsed
            if sum(j.score is not None for j in work.judgements.values()) < 2:
                self.writer.reject(work, UNPARSED)
                continue
            best, worst = best_and_worst(work)
            if work.judgements[best].score == work.judgements[worst].score:
                self.writer.reject(work, TIE)

    def compare(self, judge, settings: judging.JudgeSettings) -> None:
        if not self.cfg.confirm:
            for work in self.work.values():
                if not work.done:
                    self.writer.keep(work, None)
            return
        pairs = []
        for work in self.work.values():
            if not work.done:
                best, worst = best_and_worst(work)
                pairs.append(judging.Pair(work.task.id, work.task.instruction, work.answers[best], work.answers[worst],
                                          work.task.input))
        for pair, verdict in judging.pairwise_verdicts(judge, pairs, settings):
            work = self.work[pair.key]
            failed = next((r.error for r in verdict.responses if r.error is not None), None)
            if failed is not None:
                self.writer.fail(work, failed)
            elif verdict.winner == "a":
                self.writer.keep(work, verdict)
            else:
                reason = UNPARSED if verdict.winner is None else CONTRADICTS if verdict.winner == "b" \
                    else FLIP if verdict.flipped else PAIRWISE_TIE
                self.writer.reject(work, reason, verdict=verdict)


# ---------------------------------------------------------------- records


def answer_details(work: Work) -> list[dict]:
    out = []
    for i, answer in enumerate(work.answers):
        judgement = work.judgements.get(i)
        score = None if judgement is None or judgement.score is None else round(judgement.score, SCORE_DIGITS)
        out.append({"text": answer, "score": score, "reason": judgement.reason if judgement else ""})
    return out


def judge_details(work: Work, verdict: judging.Verdict | None) -> dict:
    details: dict = {"dropped": dict(work.dropped), "answers": [{k: v for k, v in a.items() if k != "text"}
                                                                for a in answer_details(work)]}
    if verdict is not None:
        details["pairwise"] = {"winner": verdict.winner, "flipped": verdict.flipped, "orders": list(verdict.orders),
                               "reasons": list(verdict.reasons)}
        if verdict.rubric is not None:
            details["pairwise"]["rubric"] = verdict.rubric.name
    rubric = next((j.rubric for j in work.judgements.values() if j.rubric is not None), None)
    if rubric is not None:
        details.update(rubric=rubric.name, rubric_sha256=rubric.sha256)
    details["scoring"] = next((j.scoring for j in work.judgements.values() if j.scoring), "")
    details["confirmed"] = verdict is not None  # False: pointwise scores alone (--no-confirm)
    return details


class Writer:
    """Every task ends in exactly one line of one of the two files, or is counted as failed."""

    def __init__(self, cfg: Config, kept: AppendLog, rejected: AppendLog, stats: Stats, models: dict, bar):
        self.cfg, self.kept, self.rejected, self.stats, self.models, self.bar = cfg, kept, rejected, stats, models, bar

    def keep(self, work: Work, verdict: judging.Verdict | None) -> None:
        best, worst = best_and_worst(work)
        chosen, rejected = work.judgements[best], work.judgements[worst]
        record = make_pair(work.task.id, work.task.instruction, work.task.input, work.answers[best],
                           work.answers[worst], fmt=self.cfg.format,
                           scores={"chosen": round(chosen.score, SCORE_DIGITS),
                                   "rejected": round(rejected.score, SCORE_DIGITS)},
                           reasons={"chosen": chosen.reason, "rejected": rejected.reason}, models=self.models)
        record["margin"] = round(record["margin"], SCORE_DIGITS)
        record["judge"] = judge_details(work, verdict)
        self.kept.write(record)
        self.stats.written += 1
        self._done(work)

    def reject(self, work: Work, reason: str, *, verdict: judging.Verdict | None = None, error: str | None = None,
               **extra) -> None:
        record = {"id": work.task.id, "instruction": work.task.instruction, "input": work.task.input, "reason": reason,
                  "answers": answer_details(work), "judge": judge_details(work, verdict), "models": self.models,
                  "label_source": "judge", **extra}
        if error is not None:
            record["error"] = error
        self.rejected.write(record)
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        self.stats.ties += reason in TIES
        self.stats.flips += reason in FLIPS
        self._done(work)

    def fail(self, work: Work, error: str) -> None:
        self.stats.failed += 1
        self.stats.last_error = error
        self._done(work)

    def _done(self, work: Work) -> None:
        work.done = True
        self.bar.update()
        self.bar.set_postfix(pairs=self.stats.written, rejected=sum(self.stats.rejected.values()), refresh=False)


# ---------------------------------------------------------------- the stage


def open_clients(cfg: Config, client=None, judge_client=None):
    """(policy, judge): one client when the judge is the policy (one model in memory), else two."""
    policy = open_client(cfg, client)
    judge_options = cfg.judge_options()
    if judge_client is None and judge_options == BackendOptions.of(cfg):
        return policy, policy
    try:
        return policy, open_client(judge_options, judge_client)
    except BaseException:
        policy.close()
        raise


def share_limit(active, other, cfg: Config) -> None:
    """One token limit over both clients: before a step, the client about to spend gets what the other left.

    The steps run one after the other, so this keeps the overshoot at one request, as for one client.
    """
    total, _ = token_limit(cfg)
    if total is not None and active is not other:
        active.limit = total - other.spent


@locked_outputs
def run(cfg: Config, *, client=None, judge_client=None) -> Stats:
    """Make the pairs; `client` / `judge_client` replace the policy's / the judge's backend (tests)."""
    started = time.monotonic()
    out = check_output_path(cfg.out, "--out")
    rejected_path = check_output_path(rejected_path_for(out), "--out")
    claim_outputs({"--in": cfg.in_path, "--labels": cfg.labels, "--seeds": cfg.seeds, "--rubric": cfg.rubric,
                   "--pairwise-rubric": cfg.pairwise_rubric}, {"--out": [out, rejected_path]})
    for language in judging.LABELS:  # a bad rubric fails before any model is loaded
        judging.load_rubric("pointwise", language, cfg.rubric)
        judging.load_rubric("pairwise", language, cfg.pairwise_rubric)
    if cfg.labels and not Path(cfg.labels).is_file():
        raise UserError(f"--labels {cfg.labels}: no such file (`python -m pipeline label {cfg.out}` writes it)")
    labels = load_records(cfg.labels, validate=lambda r, line: check_label(r, line, cfg.labels),
                          allow_empty=True) if cfg.labels else None
    tasks = load_tasks(cfg.in_path, cfg.limit)
    tasks, overlapping = split_heldout(tasks, cfg)
    stats = Stats(instructions=len(tasks) + len(overlapping))
    policy, judge = open_clients(cfg, client, judge_client)
    with removed_if_unused([out, rejected_path], [config_path_for(out)]):
        try:
            _make_pairs(cfg, tasks, overlapping, policy, judge, stats, out, rejected_path)
        finally:
            policy.close()
            if judge is not policy:
                judge.close()
        if labels is not None:
            stats.labels = relabel(out, rejected_path, labels)
        finish_stats(stats, out, policy, judge, started)
        write_resolved_config(cfg, out, {"stats": asdict(stats)})
        cards.write_dataset_card(out, stage="prefs", records=None, inputs={"--in": cfg.in_path},
                                 settings={"policy": policy.model, "judge": judge.model,
                                           "pairwise confirmation": cfg.confirm},
                                 rejects=cards.rejects_by_reason(rejected_path, "prefs"))
        print_summary(stats, out, rejected_path)
        if stats.failed:
            raise UserError(f"{stats.failed} instruction(s) had a request fail after all retries ({stats.last_error}); "
                            "rerun the same command to ask again")
    return stats


def _make_pairs(cfg: Config, tasks: list[Task], overlapping: list[tuple[Task, str]], policy, judge, stats: Stats,
                out: Path, rejected_path: Path) -> None:
    from tqdm import tqdm

    models = {"policy": policy.model, "judge": judge.model}
    settings = cfg.settings()
    with AppendLog(out) as kept, AppendLog(rejected_path) as rejected:
        done = settled_ids(kept.records, out, cfg.format) | settled_ids(rejected.records, rejected_path, None)
        stats.resumed = sum(task.id in done for task in tasks) + sum(task.id in done for task, _ in overlapping)
        pending = [task for task in tasks if task.id not in done]
        with tqdm(total=len(pending), desc="prefs", unit="instr", disable=None, file=sys.stderr) as bar:
            writer = Writer(cfg, kept, rejected, stats, models, bar)
            for task, seed_id in overlapping:
                if task.id not in done:
                    writer.reject(Work(task), EVAL_OVERLAP, heldout_seed=seed_id)
            for start in range(0, len(pending), cfg.chunk_size):
                chunk = Chunk(pending[start:start + cfg.chunk_size], cfg, writer)
                steps = ((policy, judge, lambda: chunk.sample(policy)),
                         (judge, policy, lambda: chunk.score(judge, settings)),
                         (judge, policy, lambda: chunk.compare(judge, settings)))
                for client, other, step in steps:
                    share_limit(client, other, cfg)
                    step()
                    if client.stopped:
                        stats.stopped = client.stopped
                        return


def relabel(out: Path, rejected_path: Path, labels: list[dict]) -> dict[str, int]:
    """Apply a person's labels to every pair (and to pairs a person tied earlier, so a changed mind counts).

    The rejected file is written first: a crash between the two writes leaves a dropped pair in both
    files, which the next run reads once (ids from --out win), never a pair in neither.
    """
    pairs = _read(out)
    ids = {p["id"] for p in pairs}
    others, tied = [], []
    for record in _read(rejected_path):
        (tied if record.get("reason") == HUMAN_TIE and record["id"] not in ids else others).append(record)
    result = apply_labels(pairs + [{k: v for k, v in r.items() if k != "reason"} for r in tied], labels)
    write_jsonl_atomic(rejected_path, others + result.dropped, keep_empty=False)
    write_jsonl_atomic(out, result.pairs, keep_empty=False)
    return {"confirmed": result.confirmed, "overridden": result.overridden, "dropped": len(result.dropped),
            "stale": result.stale}


def _read(path: Path) -> list[dict]:
    return load_records(path, allow_empty=True) if path.is_file() else []


def finish_stats(stats: Stats, out: Path, policy, judge, started: float) -> None:
    pairs = _read(out)
    stats.pairs_total = len(pairs)
    counts = Counter(min(MARGIN_BUCKETS[-1], max(1, math.ceil(abs(p.get("margin") or 0)))) for p in pairs)
    stats.margin_histogram = {f"{b - 1}-{b}": counts.get(b, 0) for b in MARGIN_BUCKETS}
    for client in {id(policy): policy, id(judge): judge}.values():
        totals = client.totals
        stats.requests += totals.requests
        stats.cached += totals.cached
        stats.prompt_tokens += totals.prompt_tokens
        stats.completion_tokens += totals.completion_tokens
    stats.seconds = round(time.monotonic() - started, 3)


def print_summary(stats: Stats, out: Path, rejected_path: Path) -> None:
    rejects = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.rejected.items())) or "none"
    top = max(stats.margin_histogram.values(), default=0) or 1
    lines = [
        f"prefs: {stats.written} pairs written this run to {out} ({stats.pairs_total} in all; {stats.resumed} of "
        f"{stats.instructions} instructions were done before)",
        f"  rejected   {sum(stats.rejected.values())} -> {rejected_path}: {rejects}",
        f"  ties {stats.ties}, flips {stats.flips} (the pairwise verdict changed with the order or went against "
        "the scores)",
        "  margin (chosen - rejected score, every pair):",
        *(f"    {bucket}  {'#' * round(BAR_WIDTH * count / top):<{BAR_WIDTH}} {count}"
          for bucket, count in stats.margin_histogram.items()),
        f"  requests   {stats.requests} ({stats.cached} cached), {stats.prompt_tokens:,} prompt + "
        f"{stats.completion_tokens:,} completion tokens, {stats.seconds:.1f} s",
    ]
    if stats.labels:
        lines.append("  labels     " + ", ".join(f"{k} {v}" for k, v in stats.labels.items())
                     + " (confirmed/overridden: the person agreed/disagreed with the judge)")
    if stats.stopped:
        flag = "--max-tokens-total" if stats.stopped == "max_tokens_total" else "--budget"
        lines.append(f"  stopped    {flag} reached; raise it and rerun the same command to continue")
    if stats.failed:
        lines.append(f"  {stats.failed} instruction(s) failed after all retries: rerun the same command to ask again")
    print("\n".join(lines))
