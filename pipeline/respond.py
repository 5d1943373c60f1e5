"""Write inputs and outputs for every kept instruction, as Alpaca JSONL (Self-Instruct, step 3).

    python -m pipeline respond --in data/filtered_instructions.jsonl --seeds seeds/seed_tasks.jsonl \\
        --out data/alpaca_data.jsonl [--format alpaca|messages] [--instances-per-instruction K]

(or `make respond`). For each instruction:

1. Classification or not: the instruction record's own `is_classification` when it has one,
   else the model is asked, with few-shot examples from the seeds' flags in the instruction's
   language. Few-shot examples come from the training seeds only: the held-out ones
   (`pipeline.seeds`) are eval's unseen tasks. An answer that is neither yes nor no counts as "not classification" (the
   input-first path suits any task); `classification_source` says which it was.
2. K instances (`--instances-per-instruction`), one request each with its own seed and its own
   few-shot draw, so the K differ: input-first (`Input: ... Output: ...`) for most tasks,
   output-first (`Label: ... Input: ...`) for classification. Prompts and parsing live in
   `pipeline/respond_prompts.py`. An input-first answer that stops after its input (small
   models do) gets one follow-up request: the instruction and that input, as the user turn it
   will be in training, whose answer is the output.
3. Checks; a failing instance goes to `<out stem>.rejected.jsonl` with its `reason`:
   `cut_off`, `empty_output`, `output_equals_instruction`, `output_equals_input`, `too_long`,
   `duplicate_instance`, `conflicting_output`; and `request_rejected` (with the server's
   `error`) for an instance whose request the server refused (400/422: too long, a content
   filter), which no rerun sends again.

Resuming: every instance has the id `<instruction id>-<k>` and ends up in exactly one of the
two files, one flushed line each. A rerun skips every id found in either file and rebuilds the
duplicate checks from the kept records, so after `kill -9` it asks only for what is missing,
including the missing instances of an instruction that was half done (its classification
decision is read back from its records, not asked again). A request that fails after all
retries is written nowhere and is asked again by the next run; the run says how many failed,
with the error, and exits non-zero. `--max-tokens-total` / `--budget` stop the run cleanly
(the next run goes on), as in `generate`.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from pipeline import cards, respond_prompts
from pipeline.backends import BackendOptions, Request, Response, open_client
from pipeline.config import option, write_resolved_config
from pipeline.errors import InputError, UserError
from pipeline.jsonl import (INSTRUCTION_FIELDS, AppendLog, check_output_path, claim_outputs, config_path_for,
                            load_records, locked_outputs, rejected_path_for, removed_if_unused)
from pipeline.lang import language_of, text_length
from pipeline.seeds import SeedTask, load_seed_split
from pipeline.templates import to_messages

# An instruction record may carry the flag from a seed-style source; anything else is provenance.
INPUT_FIELDS = {**INSTRUCTION_FIELDS, "is_classification": (bool, False, False)}
# Fields of an input record that respond writes itself; the rest travels on as provenance.
OWN_FIELDS = ("id", "instruction", "input", "output", "is_classification", "instances")

# A request the server refused (400/422: too long, a content filter): its instances are
# recorded under this reason with the server's message, so a rerun does not send it again.
REQUEST_REJECTED = "request_rejected"
# The decision is one word; a few tokens leave room for "Yes." or "はい、".
DECISION_MAX_TOKENS = 8
# Greedy decoding for the yes/no question: it is a judgement, not a creative answer.
DECISION_TEMPERATURE = 0.0


@dataclass(frozen=True)
class Config(BackendOptions):
    in_path: str = option("data/filtered_instructions.jsonl", "kept instructions from `filter`", flag="--in")
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks: the few-shot examples and classification flags")
    out: str = option("data/alpaca_data.jsonl", "training records, appended as they are written")
    format: Literal["alpaca", "messages"] = option(
        "alpaca", "alpaca: instruction/input/output; messages: a user/assistant conversation (TRL, axolotl)")
    instances_per_instruction: int = option(1, "how many different instances to ask for per instruction", min=1)
    max_output_words: int = option(400, "reject outputs longer than this (words; characters for Japanese)", min=1)
    temperature: float = option(0.3, "sampling temperature for instances: low keeps small models on the format; "
                                     "the K instances still differ by seed and few-shot draw", min=0)
    top_p: float = option(0.9, "nucleus sampling for instances", above=0, max=1)
    max_tokens: int = option(256, "most tokens per instance answer; an answer cut there is rejected as cut_off", min=1)
    seed: int | None = option(42, "sampling seed; instance k of an instruction uses seed + k")

    # No __post_init__ of its own: BackendOptions' checks every field's bounds and choices (the metadata).


@dataclass
class Stats:
    instructions: int = 0
    instructions_done: int = 0  # all K instances settled (kept or rejected), this run or before
    resumed: int = 0  # instances found in the output files at start
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # requests that failed after all retries; the next run asks again
    last_error: str = ""  # the last of those failures, as the client described it
    classification: dict[str, int] = field(default_factory=dict)  # source -> count
    output_first: int = 0
    input_first: int = 0
    followups: int = 0  # input-first answers without an output, asked for it in a second request
    requests: int = 0  # answers received, cached ones included
    sent: int = 0  # requests that went to the backend: answered, failed, rejected or abandoned
    abandoned: int = 0
    retries: int = 0
    cached: int = 0
    stopped: str = ""  # the spending limit that ended the run early, if one did
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class Task:
    id: str
    instruction: str
    language: str
    provenance: dict
    is_classification: bool | None = None
    source: str = ""  # record (the input said), model (asked), default (the model's answer was unclear)


def instance_id(task_id: str, k: int) -> str:
    return f"{task_id}-{k}"


def fold_case_space(text: str) -> str:
    """What the equality and duplicate checks compare: case and whitespace do not make a new instance."""
    return " ".join(text.split()).casefold()


# ---------------------------------------------------------------- loading and resuming


def load_tasks(path) -> list[Task]:
    tasks: list[Task] = []
    first_line: dict[str, int] = {}

    def validate(record: dict, line: int) -> None:
        task_id = str(record.get("id", f"instruction_{line}"))
        if task_id in first_line:
            raise InputError(path, line, "id", f"duplicate id {task_id!r} (first on line {first_line[task_id]}); "
                             "instance ids are built from it")
        first_line[task_id] = line
        instruction = record["instruction"].strip()
        flag = record.get("is_classification")
        tasks.append(Task(task_id, instruction, language_of(instruction),
                          {k: v for k, v in record.items() if k not in OWN_FIELDS}, flag, "record" if flag is not None else ""))

    load_records(path, INPUT_FIELDS, validate=validate)
    return tasks


@dataclass
class Ledger:
    """What is already settled: ids in either file, and the kept instances the duplicate checks see."""

    done: set[str] = field(default_factory=set)
    decisions: dict[str, tuple[bool, str]] = field(default_factory=dict)  # instruction id -> (flag, source)
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (instruction, input, output) -> id
    outputs: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (instruction, input) -> (output, id)

    def keep(self, record_id: str, instruction: str, given: str, output: str) -> None:
        key = (fold_case_space(instruction), fold_case_space(given))
        self.seen[(*key, fold_case_space(output))] = record_id
        self.outputs.setdefault(key, (fold_case_space(output), record_id))

    def settle(self, record: dict) -> None:
        self.done.add(record["id"])
        if "instruction_id" in record and "is_classification" in record:
            self.decisions.setdefault(record["instruction_id"], (record["is_classification"],
                                                                 record.get("classification_source", "record")))


def alpaca_fields(record: dict, tasks_by_id: dict[str, Task]) -> tuple[str, str, str]:
    """(instruction, input, output) of a kept record in either format."""
    if "messages" not in record:
        return record["instruction"], record.get("input", ""), record["output"]
    user = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
    output = next((m["content"] for m in record["messages"] if m["role"] == "assistant"), "")
    task = tasks_by_id.get(record.get("instruction_id", ""))
    instruction = task.instruction if task else user
    given = user[len(instruction):].strip() if user.startswith(instruction) else ""
    return instruction, given, output


def check_resumable(records: list[dict], fmt: str, path: Path) -> None:
    for line, record in enumerate(records, start=1):
        if "id" not in record:
            raise InputError(path, line, "id", "missing: this file was not written by `respond`; use another --out")
        has_messages = "messages" in record
        if has_messages != (fmt == "messages"):
            found = "messages" if has_messages else "alpaca"
            raise UserError(f"--out {path}: holds {found} records; --format {fmt} would mix two formats in one file "
                            "(use another --out, or the same --format to resume)")


def build_ledger(kept: list[dict], rejected: list[dict], tasks_by_id: dict[str, Task]) -> Ledger:
    ledger = Ledger()
    for record in kept:
        ledger.settle(record)
        ledger.keep(record["id"], *alpaca_fields(record, tasks_by_id))
    for record in rejected:
        ledger.settle(record)
    return ledger


# ---------------------------------------------------------------- checks and records


def check_instance(instruction: str, given: str, output: str, finish_reason: str, cfg: Config,
                   ledger: Ledger) -> tuple[str | None, str]:
    """The reject reason (or None) and the id of the kept record it clashes with ("" if none)."""
    if finish_reason == "length":
        return "cut_off", ""
    if not output.strip():
        return "empty_output", ""
    if fold_case_space(output) == fold_case_space(instruction):
        return "output_equals_instruction", ""
    if given and fold_case_space(output) == fold_case_space(given):
        return "output_equals_input", ""
    if text_length(output) > cfg.max_output_words:
        return "too_long", ""
    key = (fold_case_space(instruction), fold_case_space(given))
    if (*key, fold_case_space(output)) in ledger.seen:
        return "duplicate_instance", ledger.seen[(*key, fold_case_space(output))]
    # Only for a real input: a task that takes none (write a poem) has many right outputs, and
    # K of them are K good examples, not a contradiction.
    if given and key in ledger.outputs:
        return "conflicting_output", ledger.outputs[key][1]
    return None, ""


def provenance(task: Task, k: int, responses: list[Response], finish_reason: str) -> dict:
    """Where an instance came from; `responses` are its answer and, if one was needed, the follow-up's."""
    last = responses[-1]
    return {
        "id": instance_id(task.id, k),
        "instruction_id": task.id,
        "is_classification": bool(task.is_classification),
        "classification_source": task.source,
        "backend": last.backend,
        "model": last.model,
        "engine": last.engine,
        "precision": last.precision,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": sum(r.prompt_tokens for r in responses),
                  "completion_tokens": sum(r.completion_tokens for r in responses)},
        "request_id": last.request_id or "",
        "cached": all(r.cached for r in responses),
        "followup": len(responses) > 1,
        "instruction_provenance": task.provenance,
    }


def kept_record(task: Task, given: str, output: str, meta: dict, fmt: str) -> dict:
    alpaca = {"instruction": task.instruction, "input": given, "output": output}
    if fmt == "messages":
        return {"messages": to_messages(alpaca), **meta}
    return {**alpaca, **meta}


# ---------------------------------------------------------------- requests


def _request(key: str, prompt: respond_prompts.Prompt, cfg: Config, **sampling) -> Request:
    if cfg.api == "chat":
        return Request(key=key, messages=prompt.messages, **sampling)
    return Request(key=key, prompt=prompt.text, **sampling)


def _rng(cfg: Config, *parts) -> random.Random:
    # Seeded by the instruction (and instance), not by position: a rerun builds the very same
    # prompts, so the request cache answers them, whatever else changed in the input file.
    return random.Random(":".join(str(p) for p in (cfg.seed, *parts)))


def decision_requests(tasks: list[Task], seeds: list[SeedTask], cfg: Config) -> Iterator[Request]:
    for task in tasks:
        examples = respond_prompts.pick_decision_examples(seeds, task.language, _rng(cfg, task.id, "decision"))
        prompt = respond_prompts.decision_prompt(task.instruction, examples, task.language)
        yield _request(task.id, prompt, cfg, temperature=DECISION_TEMPERATURE, max_tokens=DECISION_MAX_TOKENS,
                       seed=cfg.seed)


def instance_prompt(task: Task, k: int, seeds: list[SeedTask], cfg: Config) -> respond_prompts.Prompt:
    kind = "output_first" if task.is_classification else "input_first"
    examples = respond_prompts.pick_instance_examples(seeds, task.language, bool(task.is_classification),
                                                      _rng(cfg, task.id, k))
    return respond_prompts.instance_prompt(kind, task.instruction, examples, task.language)


# ---------------------------------------------------------------- the stage


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    started = time.monotonic()
    # Held-out seed tasks are evaluation's unseen tasks: never a few-shot example (pipeline.seeds).
    seeds = load_seed_split(cfg.seeds).train
    tasks = load_tasks(cfg.in_path)
    out = check_output_path(cfg.out, "--out")
    rejected_path = check_output_path(rejected_path_for(out), "--out")
    claim_outputs({"--in": cfg.in_path, "--seeds": cfg.seeds}, {"--out": [out, rejected_path]})
    tasks_by_id = {task.id: task for task in tasks}
    stats = Stats(instructions=len(tasks))
    # The client first: a model that fails to load (or an unusable --cache-dir) must not leave
    # empty output files behind; nor must a server that refuses the first requests (401).
    client = open_client(cfg, client)
    # A run that wrote no record and ends with an error (401, a dead server) leaves no files.
    with removed_if_unused([out, rejected_path], [config_path_for(out)]):
        try:
            with AppendLog(out) as kept, AppendLog(rejected_path) as rejected:
                check_resumable(kept.records, cfg.format, out)
                check_resumable(rejected.records, "alpaca", rejected_path)  # rejects are always alpaca-shaped
                ledger = build_ledger(kept.records, rejected.records, tasks_by_id)
                stats.resumed = len(ledger.done)
                sink = _Sink(cfg, ledger, kept, rejected, stats)
                _decide(tasks, ledger, seeds, cfg, client, sink)
                if not client.stopped:
                    _respond(tasks, ledger, seeds, cfg, client, sink)
                stats.rejected = dict(sink.reasons.most_common())
                stats.stopped = client.stopped or ""
        finally:
            client.close()
        k = cfg.instances_per_instruction
        stats.instructions_done = sum(all(instance_id(t.id, i) in ledger.done for i in range(k)) for t in tasks)
        _count_requests(stats, client.totals)
        stats.seconds = round(time.monotonic() - started, 3)
        write_resolved_config(cfg, out, {"stats": asdict(stats)})
        upstream, filter_rejects = cards.filter_settings(cfg.in_path)
        cards.write_dataset_card(out, stage="respond", records=None,
                                 inputs={"--in": cfg.in_path, "--seeds": cfg.seeds}, settings=upstream,
                                 rejects={**filter_rejects, **cards.rejects_by_reason(rejected_path, "respond")})
        print_summary(stats, out, rejected_path)
        if stats.failed:
            raise UserError(f"{stats.failed} requests failed after all retries ({stats.last_error}); "
                            f"rerun the same command to ask them again")
    return stats


def _count_requests(stats: Stats, totals) -> None:
    stats.requests, stats.cached, stats.retries = totals.requests, totals.cached, totals.retries
    stats.sent, stats.abandoned = totals.sent, totals.abandoned
    stats.prompt_tokens, stats.completion_tokens = totals.prompt_tokens, totals.completion_tokens


def _pending(task: Task, ledger: Ledger, cfg: Config) -> list[int]:
    return [k for k in range(cfg.instances_per_instruction) if instance_id(task.id, k) not in ledger.done]


def _decide(tasks: list[Task], ledger: Ledger, seeds: list[SeedTask], cfg: Config, client, sink: "_Sink") -> None:
    """Set `is_classification` on every task: from its record, from earlier records, or by asking."""
    from tqdm import tqdm

    to_ask = []
    for task in tasks:
        if task.is_classification is None and task.id in ledger.decisions:
            task.is_classification, task.source = ledger.decisions[task.id]
        elif task.is_classification is None and _pending(task, ledger, cfg):
            to_ask.append(task)
    by_id = {task.id: task for task in to_ask}
    with tqdm(total=len(to_ask), desc="classify", unit="instr", disable=None) as bar:
        for response in client.stream(decision_requests(to_ask, seeds, cfg)):
            bar.update()
            task = by_id[response.request.key]
            if (answered := sink.usable(response, task, _pending(task, ledger, cfg))) is None:
                continue
            answer = respond_prompts.parse_yes_no(answered[0])
            task.is_classification, task.source = (False, "default") if answer is None else (answer, "model")
    stats = sink.stats
    for task in tasks:
        if task.source:
            stats.classification[task.source] = stats.classification.get(task.source, 0) + 1


class _Sink:
    """Checks an instance and writes it to exactly one of the two files."""

    def __init__(self, cfg: Config, ledger: Ledger, kept: AppendLog, rejected: AppendLog, stats: Stats):
        self.cfg, self.ledger, self.kept, self.rejected, self.stats = cfg, ledger, kept, rejected, stats
        self.reasons: Counter[str] = Counter()

    def settle(self, task: Task, k: int, parsed: respond_prompts.ParsedInstance, finish: str, responses: list[Response],
               answer: str) -> None:
        reason, clash = check_instance(task.instruction, parsed.input, parsed.output, finish, self.cfg, self.ledger)
        meta = provenance(task, k, responses, finish)
        if reason is None:
            self.kept.write(kept_record(task, parsed.input, parsed.output, meta, self.cfg.format))
            self.ledger.keep(meta["id"], task.instruction, parsed.input, parsed.output)
            self.stats.written += 1
        else:
            self.rejected.write({"instruction": task.instruction, "input": parsed.input, "output": parsed.output,
                                 "reason": reason, "clashes_with": clash, "raw_answer": answer, **meta})
            self.reasons[reason] += 1
        self.ledger.done.add(meta["id"])

    def usable(self, response: Response, task: Task, ks: list[int], earlier: tuple[Response, ...] = (),
               given: str = "") -> tuple[str, str] | None:
        """(text, finish_reason) of an answer; None for a failure (counted; the next run asks
        again) or a rejection (instances `ks` recorded as rejected; the next run does not)."""
        if response.error is None and response.texts:
            return response.texts[0], response.finish_reasons[0] if response.finish_reasons else ""
        if not response.rejected:
            self.stats.failed += 1
            self.stats.last_error = response.error or "an answer without text"
            return None
        for k in ks:
            meta = provenance(task, k, [*earlier, response], "")
            if task.is_classification is None:  # the decision was refused: there is none to resume from
                del meta["is_classification"], meta["classification_source"]
            self.rejected.write({"instruction": task.instruction, "input": given, "output": "",
                                 "reason": REQUEST_REJECTED, "error": response.error, **meta})
            self.reasons[REQUEST_REJECTED] += 1
            self.ledger.done.add(meta["id"])
        return None


def _respond(tasks: list[Task], ledger: Ledger, seeds: list[SeedTask], cfg: Config, client, sink: _Sink) -> None:
    """Ask for every pending instance; an input-first answer that stopped after its input gets a follow-up."""
    from tqdm import tqdm

    stats = sink.stats
    jobs = [(task, k) for task in tasks if task.is_classification is not None for k in _pending(task, ledger, cfg)]
    stats.output_first = sum(1 for task, _ in jobs if task.is_classification)
    stats.input_first = len(jobs) - stats.output_first
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, stop=respond_prompts.STOP)
    built: dict[str, tuple[Task, int, respond_prompts.Prompt]] = {}
    # Small models often write the input and stop. Rather than reject the instance, the input
    # they wrote is sent back as a plain instruction + input request: the one kind of prompt
    # every instruct model answers. Only these cost a second request.
    missing: dict[str, tuple[Task, int, str, Response]] = {}

    def requests() -> Iterator[Request]:
        for task, k in jobs:
            prompt = instance_prompt(task, k, seeds, cfg)
            key = instance_id(task.id, k)
            built[key] = (task, k, prompt)
            yield _request(key, prompt, cfg, seed=None if cfg.seed is None else cfg.seed + k, **sampling)

    with tqdm(total=len(jobs), desc="respond", unit="inst", disable=None) as bar:
        for response in client.stream(requests()):
            bar.update()
            task, k, prompt = built.pop(response.request.key)
            if (answered := sink.usable(response, task, [k])) is None:
                continue
            text, finish = answered
            answer = prompt.answer(text, cfg.api)
            parse = respond_prompts.parse_output_first if task.is_classification else respond_prompts.parse_input_first
            parsed = parse(answer)
            if not task.is_classification and parsed.input and not parsed.output and finish != "length":
                missing[response.request.key] = (task, k, parsed.input, response)
            else:
                sink.settle(task, k, parsed, finish, [response], answer)
            bar.set_postfix(kept=stats.written, rejected=sum(sink.reasons.values()), refresh=False)

    def followups() -> Iterator[Request]:
        for key, (task, k, given, _) in list(missing.items()):
            prompt = respond_prompts.output_prompt(task.instruction, given, task.language)
            yield _request(key, prompt, cfg, seed=None if cfg.seed is None else cfg.seed + k, **sampling)

    stats.followups = len(missing)
    with tqdm(total=len(missing), desc="outputs", unit="inst", disable=None) as bar:
        for response in client.stream(followups()):
            bar.update()
            task, k, given, first = missing.pop(response.request.key)
            if (answered := sink.usable(response, task, [k], (first,), given)) is None:
                continue
            text, finish = answered
            output = respond_prompts.parse_output_only(text)
            sink.settle(task, k, respond_prompts.ParsedInstance(given, output), finish, [first, response], text)


def print_summary(stats: Stats, out: Path, rejected_path: Path) -> None:
    rejects = sum(stats.rejected.values())
    rejected_requests = stats.rejected.get(REQUEST_REJECTED, 0)
    by_reason = ", ".join(f"{reason} {count}" for reason, count in stats.rejected.items()) or "none"
    sources = ", ".join(f"{count} {source}" for source, count in stats.classification.items()) or "none needed"
    lines = [
        f"respond: {stats.instructions_done}/{stats.instructions} instructions done; "
        f"{stats.written} instances written to {out}" + (f" ({stats.resumed} already there)" if stats.resumed else ""),
        f"  rejected {rejects} -> {rejected_path}: {by_reason}",
        f"  classification decided by: {sources}; this run {stats.output_first} output-first, "
        f"{stats.input_first} input-first ({stats.followups} needed a second request for the output)",
        f"  {stats.sent} requests sent ({stats.requests - stats.cached - stats.failed - rejected_requests} answered, "
        f"{stats.failed} failed, {rejected_requests} rejected, {stats.abandoned} abandoned), {stats.cached} from cache, "
        f"{stats.retries} retries; {stats.prompt_tokens} prompt + {stats.completion_tokens} completion tokens, "
        f"{stats.seconds:.1f} s",
    ]
    if stats.stopped:
        flag = "--max-tokens-total" if stats.stopped == "max_tokens_total" else "--budget"
        lines.append(f"  stopped: {flag} reached; raise it and rerun the same command to continue")
    if stats.failed:
        lines.append(f"  {stats.failed} requests failed after all retries: rerun the same command to ask again")
    print("\n".join(lines), file=sys.stdout)
