"""Bootstrap new instructions from the seed tasks (Self-Instruct, step 1).

    python -m pipeline generate --seeds seeds/seed_tasks.jsonl --out data/machine_instructions.jsonl \\
        --num-instructions 100 --mode self-instruct --backend local

Each request shows the model a numbered list of example tasks (by default 6 sampled from the
seeds and 2 from the instructions already accepted, seeds filling in while the pool is small)
and asks it to continue the list. The continuation is parsed (`pipeline.prompts`), and each
candidate joins the pool only if it passes the filter's own checks, used online: the named checks
of `pipeline.heuristics` and ROUGE-L F1 at or under `--threshold` against every seed and every pool
member (`pipeline.similarity.RougeIndex`). That one rule also decides exact repeats, so
`generate` and `filter` keep the same candidates for any threshold and with `--no-heuristics`.
Held-out seed tasks (listed beside the seed file, `pipeline.seeds`) are in the pool but never
shown as examples; a candidate too close to one is rejected as `eval_overlap` (decontamination).
The run stops when the pool holds exactly `--num-instructions` new instructions; answers still
in flight then are not used.

`--mode alpaca` follows Stanford Alpaca instead: 3 seed tasks with their input and output, and
the model writes up to 20 whole tasks per answer; input and output are kept.

Language: each request picks its language in the seeds' proportions (or only `--language ja|en`),
takes its examples from that language and uses that language's prompt text.

Files: `--out` is appended one record per accepted instruction, with its provenance;
`<out stem>.rejected.jsonl` gets every parsed candidate that was not accepted, with its reason,
highest ROUGE-L and nearest neighbour, and every request the server refused (400/422) once, as
`request_rejected` with the server's `error` (its request number is never used again, so no
rerun sends it); answers are cached under `--cache-dir`. A request that fails after all its
retries is replaced by another; the summary counts every request sent (answered, failed,
rejected, abandoned when the pool filled up). Rerunning the
same command resumes from `--out`; `kill -9` loses at most the requests in flight.
`max_rouge_l` is the index's score: exact above the threshold, a lower bound below it (pool
members sharing no rare token are never compared), as `filter` documents; `filter` recomputes
exact scores and writes them under its own keys (`filter_max_rouge_l`, `filter_most_similar`),
leaving these as they are.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

from pipeline.backends import BackendOptions, Request, Response, open_client
from pipeline.config import option, write_resolved_config
from pipeline.errors import InputError, UserError
from pipeline.heuristics import HeuristicOptions, fold_width_case_space, heuristic_reason
from pipeline.jsonl import (INSTRUCTION_FIELDS, AppendLog, check_output_path, claim_outputs, config_path_for, locked_outputs,
                            rejected_path_for, removed_if_unused)
from pipeline.lang import language_of
from pipeline.prompts import (
    Candidate, build_alpaca_prompt, build_self_instruct_prompt, load_prompt_file, parse_alpaca_tasks,
    parse_numbered_list,
)
from pipeline.seeds import EVAL_OVERLAP, HeldoutGuard, SeedTask, heldout_ids_for, load_seeds
from pipeline.similarity import NEAR_DUPLICATE_THRESHOLD, THRESHOLD_BOUNDS

# Per mode: (seed examples, machine examples, new tasks asked for, max_tokens). Self-Instruct
# shows 8 examples (6 human, 2 machine) and lets the model run on to 16; Alpaca shows 3 seed
# tasks and asks for 20 whole tasks, which needs room for 20 inputs and outputs.
MODE_DEFAULTS = {
    "self-instruct": (6, 2, 8, 512),
    "alpaca": (3, 0, 17, 3072),
}
# The local backend generates a batch until its longest row ends, and a small model that loses
# its way runs to max_tokens: 8 short tasks fit in about 200 tokens, so the local default stops
# there instead of paying CPU time for rambling.
LOCAL_MAX_TOKENS = {"self-instruct": 256, "alpaca": 1536}
ID_PREFIX = "machine_"
ID_DIGITS = 6  # machine_000123: sorts as text up to a million instructions
_ID_RE = re.compile(rf"^{ID_PREFIX}(\d+)$")
# With no --max-requests, give up after this many requests per instruction still wanted (plus
# a floor): a model that accepts less than one in ~20 requests is not going to get there, and
# a clear stop beats spending a budget on rejects.
AUTO_MAX_REQUESTS_PER_INSTRUCTION = 20
AUTO_MAX_REQUESTS_FLOOR = 64
# Request seeds are derived from --seed and the request number, in this range (the OpenAI API
# and torch both take a 32-bit seed).
SEED_RANGE = 2**31
WRONG_LANGUAGE = "wrong_language"
NEAR_DUPLICATE = "near_duplicate"
# A request the server refused (400/422) is recorded once under this reason, with its message;
# its request_index is never used again, so a rerun does not send it again.
REQUEST_REJECTED = "request_rejected"
TOKENS_PER_1K = 1000


def _mode_default(mode: str, index: int, value):
    return MODE_DEFAULTS[mode][index] if value is None else value


@dataclass(frozen=True)
class Config(BackendOptions):
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks (Self-Instruct or Alpaca JSONL)")
    out: str = option("data/machine_instructions.jsonl", "accepted instructions, appended as they are accepted")
    num_instructions: int = option(100, "stop when the pool holds this many new instructions", min=1)
    mode: Literal["self-instruct", "alpaca"] = option(
        "self-instruct", "self-instruct: continue a list of instructions; alpaca: write whole tasks with input and output")
    language: Literal["all", "ja", "en"] = option("all", "sample seeds of this language only (all: keep the seeds' mix)")
    threshold: float = option(NEAR_DUPLICATE_THRESHOLD, "reject a candidate whose ROUGE-L F1 against a seed or pool member "
                              "is above this", **THRESHOLD_BOUNDS)
    tokenizer: Literal["multilingual", "rouge"] = option("multilingual", "ROUGE-L tokens (see `filter --help`)")
    heuristics: bool = option(True, "apply the length, blacklist, prefix, punctuation and seed-copy checks (the same as `filter`)")
    seed_examples: int | None = option(None, "seed tasks per prompt (default: 6 self-instruct, 3 alpaca)", min=0)
    machine_examples: int | None = option(None, "accepted instructions per prompt, seeds fill in while the pool is small (default: 2 self-instruct, 0 alpaca)",
                                          min=0)
    tasks_per_request: int | None = option(None, "new tasks asked for per request (default: 8 self-instruct, 17 alpaca: 20 in all)", min=1)
    prompt_file: str | None = option(None, "prompt text instead of pipeline/prompt_files/generate_<mode>_<api>_<lang>.txt; needs an {examples} slot")
    temperature: float = option(0.7, "sampling temperature", min=0)
    top_p: float = option(0.95, "nucleus sampling", above=0, max=1)
    max_tokens: int | None = option(None, "tokens per answer (default: 512 self-instruct, 3072 alpaca; local backend 256 and 1536)", min=1)
    max_requests: int | None = option(None, f"give up after this many requests (default: {AUTO_MAX_REQUESTS_PER_INSTRUCTION} per instruction wanted, at least {AUTO_MAX_REQUESTS_FLOOR})",
                                      min=1)
    seed: int = option(42, "random seed: example sampling and each request's sampling seed")

    def __post_init__(self):
        super().__post_init__()  # every field's bounds (the metadata), and the backend's own rules
        if self.seed_examples == 0 and not self.machine_examples:
            raise UserError("--seed-examples 0: with no machine examples either, the prompt would show no examples")

    @property
    def examples_per_prompt(self) -> tuple[int, int]:
        return _mode_default(self.mode, 0, self.seed_examples), _mode_default(self.mode, 1, self.machine_examples)

    @property
    def new_per_request(self) -> int:
        return _mode_default(self.mode, 2, self.tasks_per_request)

    @property
    def answer_tokens(self) -> int:
        if self.max_tokens is None and self.backend == "local":
            return LOCAL_MAX_TOKENS[self.mode]
        return _mode_default(self.mode, 3, self.max_tokens)


@dataclass
class Stats:
    wanted: int = 0
    resumed: int = 0  # already in --out when the run started
    accepted: int = 0  # accepted in this run
    requests: int = 0  # answers received (failed and cached ones included)
    sent: int = 0  # requests that went to the backend: answered, failed, rejected or abandoned
    failed: int = 0  # failed after all their retries (the run asks others instead)
    requests_rejected: int = 0  # refused by the server (400/422), each in the rejected file
    abandoned: int = 0  # in flight when the pool was full: cancelled, their answers not used
    last_error: str = ""
    cached: int = 0
    retries: int = 0
    candidates: int = 0  # parsed items, before any check
    rejected: Counter = field(default_factory=Counter)
    surplus: int = 0  # candidates that arrived after the pool was full: not used
    empty_items: int = 0
    prompt_tokens: int = 0  # spent: cached answers cost nothing
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""  # why the run ended: done, max_requests, max_tokens_total, budget

    @property
    def pool(self) -> int:
        return self.resumed + self.accepted

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Example:
    id: str
    instruction: str
    input: str = ""
    output: str = ""


@dataclass(frozen=True)
class PromptInfo:
    """What one request showed the model, kept until its answer comes back."""

    index: int
    language: str
    seed_ids: tuple[str, ...]
    machine_ids: tuple[str, ...]
    example_texts: tuple[str, ...]
    first_number: int
    starts_inside: bool


def request_seed(seed: int, index: int) -> int:
    """A sampling seed for request `index`: fixed by --seed, different for every request."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def _id_number(record_id: str) -> int | None:
    match = _ID_RE.match(str(record_id))
    return int(match.group(1)) if match else None


class Generator:
    """The pool, its index and the two logs; turns answers into accepted and rejected records."""

    def __init__(self, cfg: Config, seeds: list[SeedTask], log: AppendLog, rejected_log: AppendLog,
                 heldout_ids: set[str] = frozenset()):
        """Every seed starts the pool; those in `heldout_ids` are never shown as examples, and a
        candidate too close to one is rejected as `eval_overlap` (see `pipeline.seeds`)."""
        from pipeline.similarity import RougeIndex

        self.cfg = cfg
        self.log = log
        self.rejected_log = rejected_log
        self.stats = Stats(wanted=cfg.num_instructions)
        self.heuristic_options = HeuristicOptions(enabled=cfg.heuristics)
        # A copy of a held-out task is `eval_overlap`, not `seed_copy`: the guard below finds it.
        self.seed_forms = {fold_width_case_space(task.instruction) for task in seeds if task.id not in heldout_ids}
        self.index = RougeIndex(cfg.threshold, cfg.tokenizer)
        for task in seeds:
            self.index.add(task.id, task.instruction)
        self.heldout_guard = HeldoutGuard([t for t in seeds if t.id in heldout_ids], cfg.threshold, cfg.tokenizer)
        seeds = [task for task in seeds if task.id not in heldout_ids]
        self.seeds_by_language: dict[str, list[Example]] = {}
        for task in seeds:
            instance = task.instances[0] if task.instances else None
            example = Example(task.id, task.instruction, instance.input if instance else "",
                              instance.output if instance else "")
            self.seeds_by_language.setdefault(task.language, []).append(example)
        if cfg.language != "all":
            check_language(cfg, seeds)
            self.seeds_by_language = {cfg.language: self.seeds_by_language[cfg.language]}
        self.languages = sorted(self.seeds_by_language)
        self.language_weights = [len(self.seeds_by_language[lang]) for lang in self.languages]
        self.machine_by_language: dict[str, list[Example]] = {}
        self._resume(log.records)
        self.next_request = 1 + max((r.get("request_index", -1) for r in log.records + rejected_log.records
                                     if isinstance(r.get("request_index"), int)), default=-1)
        self.requests_sent = 0
        self.pending: dict[str, PromptInfo] = {}
        self.prompt_texts: dict[str, str] = {}  # per language, read once

    def _resume(self, records: list[dict]) -> None:
        numbers = []
        for line, record in enumerate(records, start=1):
            record_id = record.get("id")
            if not isinstance(record_id, str) or not record_id:
                raise InputError(self.cfg.out, line, "id", "missing: this file was not written by `generate`; give another --out")
            if record_id in self.index:
                raise InputError(self.cfg.out, line, "id", f"duplicate id {record_id!r} (also a seed or an earlier line)")
            self.index.add(record_id, record["instruction"])
            self._remember(record_id, record)
            numbers.append(_id_number(record_id))
        self.next_id = 1 + max((n for n in numbers if n is not None), default=-1)
        self.stats.resumed = len(records)

    def _remember(self, record_id: str, record: dict) -> None:
        example = Example(record_id, record["instruction"], record.get("input") or "", record.get("output") or "")
        self.machine_by_language.setdefault(language_of(record["instruction"]), []).append(example)

    # ------------------------------------------------------------ requests

    @property
    def done(self) -> bool:
        return self.stats.pool >= self.cfg.num_instructions

    def prompt_text(self, language: str) -> str:
        if language not in self.prompt_texts:
            # Built-in prompts exist in English and Japanese; seeds in another language (zh, ko)
            # get the English prompt rather than a missing file.
            prompt_language = language if language in ("en", "ja") or self.cfg.prompt_file else "en"
            self.prompt_texts[language] = load_prompt_file(self.cfg.mode, self.cfg.api, prompt_language, self.cfg.prompt_file)
        return self.prompt_texts[language]

    def make_request(self) -> Request:
        """The next request, its examples drawn from the pool as it is now."""
        cfg = self.cfg
        index = self.next_request
        self.next_request += 1
        self.requests_sent += 1
        rng = random.Random(request_seed(cfg.seed, index))
        language = rng.choices(self.languages, weights=self.language_weights)[0]
        num_seed, num_machine = cfg.examples_per_prompt
        machine_pool = self.machine_by_language.get(language, [])
        machine = rng.sample(machine_pool, min(num_machine, len(machine_pool)))
        seed_pool = self.seeds_by_language[language]
        # Seeds fill the machine examples' places while the pool is small (as Self-Instruct does).
        seeds = rng.sample(seed_pool, min(num_seed + num_machine - len(machine), len(seed_pool)))
        examples = seeds + machine
        rng.shuffle(examples)
        if cfg.mode == "alpaca":
            prompt = build_alpaca_prompt(self.prompt_text(language), [(e.instruction, e.input, e.output) for e in examples],
                                         cfg.new_per_request, language)
        else:
            prompt = build_self_instruct_prompt(self.prompt_text(language), [e.instruction for e in examples], cfg.new_per_request)
        key = f"req_{index:06d}"
        completions = cfg.api == "completions"
        self.pending[key] = PromptInfo(index, language, tuple(e.id for e in seeds), tuple(e.id for e in machine),
                                       tuple(e.instruction for e in examples), len(examples) + 1, completions)
        stop = None
        if completions:  # a base model never stops by itself; end the list where it was asked to
            last = len(examples) + cfg.new_per_request
            stop = (f"\n{last + 1}.",) if cfg.mode == "self-instruct" else (f"{last + 1}. ",)
        return Request(key=key, messages=None if completions else ({"role": "user", "content": prompt},),
                       prompt=prompt if completions else None, temperature=cfg.temperature, top_p=cfg.top_p,
                       max_tokens=cfg.answer_tokens, stop=stop, seed=request_seed(cfg.seed, index))

    # ------------------------------------------------------------ answers

    def take(self, response: Response) -> None:
        """Parse one answer and accept or reject each of its candidates, in order."""
        info = self.pending.pop(response.request.key)
        stats = self.stats
        stats.requests += 1
        if response.cached:
            stats.cached += 1
        else:
            stats.prompt_tokens += response.prompt_tokens
            stats.completion_tokens += response.completion_tokens
        if response.error is not None:
            self._count_error(response, info)
            return
        parse = parse_alpaca_tasks if self.cfg.mode == "alpaca" else parse_numbered_list
        for text, finish_reason in zip(response.texts, response.finish_reasons or ["stop"] * len(response.texts)):
            parsed = parse(text, examples=info.example_texts, truncated=finish_reason == "length",
                           starts_inside=info.first_number if info.starts_inside else None)
            stats.empty_items += parsed.empty
            stats.candidates += len(parsed.items) + len(parsed.dropped)
            context = {"info": info, "response": response, "finish_reason": finish_reason}
            for reason, candidate in parsed.dropped:
                self.reject(candidate, reason, context)
            for candidate in parsed.items:
                if self.done:
                    stats.surplus += 1  # arrived after the pool was full
                    continue
                self.consider(candidate, context)

    def _count_error(self, response: Response, info: PromptInfo) -> None:
        if response.rejected:
            self.stats.requests_rejected += 1
            self.rejected_log.write({"reason": REQUEST_REJECTED, "error": response.error,
                                     **self._provenance({"info": info, "response": response, "finish_reason": ""})})
        else:
            self.stats.failed += 1
            self.stats.last_error = response.error or ""

    def consider(self, candidate: Candidate, context: dict) -> None:
        text = candidate.instruction
        reason = heuristic_reason(text, self.seed_forms, self.heuristic_options)
        if reason is None and self.cfg.language != "all" and language_of(text) != self.cfg.language:
            reason = WRONG_LANGUAGE
        # No separate exact-repeat check: the index's rule (ROUGE-L above --threshold) decides
        # repeats too, as in `filter`, so both stages keep the same candidates.
        if reason is not None:
            self.reject(candidate, reason, context)
            return
        overlap = self.heldout_guard.overlaps([text])[0]
        if overlap is not None:
            self.reject(candidate, EVAL_OVERLAP, context, (overlap[0], overlap[1].id))
            return
        record_id = f"{ID_PREFIX}{self.next_id:0{ID_DIGITS}d}"
        added, score, similar = self.index.add_unless_similar([(record_id, text)])[0]
        if not added:
            self.reject(candidate, NEAR_DUPLICATE, context, (score, similar))
            return
        self.next_id += 1
        record = {"id": record_id, "instruction": text, "language": language_of(text)}
        if candidate.output is not None:
            record.update(input=candidate.input, output=candidate.output)
        record.update(self._provenance(context), max_rouge_l=round(score, 4), most_similar=similar,
                      most_similar_instruction=self.index.text_of(similar) if similar else None)
        self.log.write(record)
        self._remember(record_id, record)
        self.stats.accepted += 1

    def reject(self, candidate: Candidate, reason: str, context: dict, match=None) -> None:
        score, similar = match or self.index.best_matches([candidate.instruction])[0]
        record = {"instruction": candidate.instruction}
        if candidate.output is not None:
            record.update(input=candidate.input, output=candidate.output)
        record.update(reason=reason, max_rouge_l=round(score, 4), most_similar=similar,
                      most_similar_instruction=self.index.text_of(similar) if similar else None,
                      **self._provenance(context))
        self.rejected_log.write(record)
        self.stats.rejected[reason] += 1

    def _provenance(self, context: dict) -> dict:
        info: PromptInfo = context["info"]
        response: Response = context["response"]
        return {
            "prompt_language": info.language,
            "prompt_seed_ids": list(info.seed_ids),
            "prompt_machine_ids": list(info.machine_ids),
            "backend": response.backend, "model": response.model,
            "engine": response.engine, "precision": response.precision,
            "request_index": info.index, "request_id": response.request_id,
            "finish_reason": context["finish_reason"], "cached": response.cached,
            "usage": {"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens},
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def max_requests_for(cfg: Config, still_wanted: int) -> int:
    if cfg.max_requests is not None:
        return cfg.max_requests
    return max(AUTO_MAX_REQUESTS_FLOOR, AUTO_MAX_REQUESTS_PER_INSTRUCTION * still_wanted)


def spent_dollars(cfg: Config, stats: Stats) -> float:
    return stats.tokens / TOKENS_PER_1K * (cfg.price_per_1k or 0.0)


def check_language(cfg: Config, seeds: list[SeedTask]) -> None:
    languages = {task.language for task in seeds}
    if cfg.language != "all" and cfg.language not in languages:
        raise UserError(f"--language {cfg.language}: {cfg.seeds} has no {cfg.language} seed tasks "
                        f"(it has {', '.join(sorted(languages))})")


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    seeds = load_seeds(cfg.seeds)
    out = check_output_path(cfg.out, "--out")
    rejected_out = check_output_path(rejected_path_for(out), "--out")
    claim_outputs({"--seeds": cfg.seeds, "--prompt-file": cfg.prompt_file}, {"--out": [out, rejected_out]})
    if cfg.prompt_file:
        load_prompt_file(cfg.mode, cfg.api, "en", cfg.prompt_file)  # a bad --prompt-file fails before any work
    check_language(cfg, seeds)
    started = time.monotonic()
    # Before any output is opened: a model that fails to load, or an unusable --cache-dir,
    # leaves nothing behind.
    client = open_client(cfg, client)
    try:
        with removed_if_unused([out, rejected_out], [config_path_for(out)]), \
                AppendLog(out, INSTRUCTION_FIELDS) as log, AppendLog(rejected_out) as rejected_log:
            gen = Generator(cfg, seeds, log, rejected_log, heldout_ids_for(cfg.seeds, seeds))
            write_resolved_config(cfg, out)
            stats = gen.stats
            if gen.done:
                print(f"{out} already holds {stats.resumed} instructions (--num-instructions {cfg.num_instructions}); nothing to do")
                stats.stopped = "done"
                return stats
            try:
                _loop(cfg, gen, client, max_requests_for(cfg, cfg.num_instructions - stats.resumed))
            finally:
                totals = client.totals
                stats.retries, stats.sent, stats.abandoned = totals.retries, totals.sent, totals.abandoned
                stats.seconds = time.monotonic() - started
    finally:
        client.close()
    print_summary(cfg, stats, out, rejected_out)
    if gen.index.tokenless_warning():  # e.g. Japanese under --tokenizer rouge: never deduplicated
        print(f"warning: {gen.index.tokenless_warning()}", file=sys.stderr)
    if stats.stopped == "max_requests":
        raise UserError(_why_short(cfg, stats, gen.requests_sent, rejected_out))
    return stats


def _why_short(cfg: Config, stats: Stats, sent: int, rejected_out: Path) -> str:
    """The one line for a run that gave up before --num-instructions: the real cause first."""
    got = f"{stats.pool} of {cfg.num_instructions} instructions"
    asked = stats.requests - stats.cached
    if stats.failed and 2 * stats.failed >= asked:
        return (f"{stats.failed} of {asked} requests failed after all retries ({stats.last_error}); stopped with {got}; "
                f"rerunning resumes")
    return (f"--max-requests: stopped after {sent} requests with {got}; the model's answers are mostly rejected "
            f"(see {rejected_out}): try another --model or --prompt-file, or raise --max-requests; rerunning resumes")


def _loop(cfg: Config, gen: Generator, client, max_requests: int) -> None:
    from tqdm import tqdm

    stats = gen.stats

    def requests() -> Iterator[Request]:
        # The client's spending limits decide, before each pull, whether another may go out.
        while not gen.done:
            if gen.requests_sent >= max_requests:
                stats.stopped = "max_requests"
                return
            yield gen.make_request()

    bar = tqdm(total=cfg.num_instructions, initial=stats.pool, desc="accepted", unit="instr", dynamic_ncols=True,
               file=sys.stderr)
    responses = client.stream(requests())
    try:
        for response in responses:
            gen.take(response)
            bar.update(stats.pool - bar.n)
            bar.set_postfix({"requests": stats.requests, **dict(stats.rejected.most_common())}, refresh=False)
            if gen.done:
                break
    finally:
        responses.close()  # cancels the requests still in flight
        bar.close()
    if gen.done:
        stats.stopped = "done"
    elif stats.stopped != "max_requests":
        stats.stopped = getattr(client, "stopped", None) or "max_requests"


def print_summary(cfg: Config, stats: Stats, out: Path, rejected_out: Path) -> None:
    minutes = stats.seconds / 60
    rate = stats.accepted / minutes if minutes > 0 else 0.0
    considered = stats.accepted + sum(stats.rejected.values())
    acceptance = stats.accepted / considered if considered else 0.0
    rejects = ", ".join(f"{reason} {count}" for reason, count in stats.rejected.most_common()) or "none"
    lines = [
        f"generate: {stats.pool}/{cfg.num_instructions} instructions in {out} ({stats.accepted} new, {stats.resumed} resumed)",
        f"  requests   {stats.sent} sent ({stats.requests - stats.cached - stats.failed - stats.requests_rejected} answered, "
        f"{stats.failed} failed, {stats.requests_rejected} rejected, {stats.abandoned} abandoned), "
        f"{stats.cached} from cache, {stats.retries} retries",
        f"  candidates {stats.candidates} parsed, {stats.accepted} accepted, {sum(stats.rejected.values())} rejected "
        f"({rejects}), {stats.surplus} surplus unused, {stats.empty_items} empty items",
        f"  tokens     {stats.tokens:,} ({stats.prompt_tokens:,} prompt + {stats.completion_tokens:,} completion)"
        + (f", ${spent_dollars(cfg, stats):.4f}" if cfg.price_per_1k is not None else ""),
        f"  time       {stats.seconds:.1f} s, {rate:.1f} accepted per minute, acceptance rate {acceptance:.1%}",
        f"  rejected   {rejected_out}",
    ]
    if stats.stopped in ("max_tokens_total", "budget"):
        flag = "--max-tokens-total" if stats.stopped == "max_tokens_total" else "--budget"
        lines.append(f"  stopped    {flag} reached before {cfg.num_instructions}; raise it and rerun to continue")
    if stats.failed:
        lines.append(f"  failed     {stats.failed} requests failed after all retries, others were asked instead "
                     f"(last: {stats.last_error})")
    print("\n".join(lines))
