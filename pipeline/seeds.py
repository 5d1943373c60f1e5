"""Seed tasks: the few hundred human-written tasks everything is bootstrapped from.

Reads the Self-Instruct format (`id, name, instruction, instances: [{input, output}],
is_classification`) and the Alpaca format (`instruction, input, output`, one instance per
line; lines with the same instruction become one task), validated line by line.

Held-out tasks: a few seed tasks are kept back as unseen tasks for `eval --data heldout`. Their
ids are listed, one a line, in a file beside the seed file (`seeds/seed_tasks.heldout.txt` for
`seeds/seed_tasks.jsonl`; `#` starts a comment), which the user may edit. `load_seed_split`
honours it: `generate` and `respond` show only the training seeds as examples, `mix` leaves the
held-out ones out, and `filter` and `generate` keep every seed in their pool but drop an
instruction too close to a held-out one as `eval_overlap`. A seed file without such a list has
no held-out tasks. The shipped list is the seeded choice of `choose_heldout`:

    python -m pipeline.seeds seeds/seed_tasks.jsonl     # (re)writes seeds/seed_tasks.heldout.txt
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError, UserError
from pipeline.jsonl import check_fields, read_records
from pipeline.lang import language_of

DEFAULT_SEEDS = "seeds/seed_tasks.jsonl"
# The share of seed tasks kept back as unseen tasks: about 20 of ~200, enough for a per-kind
# and per-language comparison while leaving nine in ten as examples (the Self-Instruct paper
# held out whole tasks the same way to measure generalisation).
HELDOUT_FRACTION = 0.1
HELDOUT_SEED = 17  # fixes which tasks `choose_heldout` picks, so the shipped list can be regenerated
HELDOUT_SUFFIX = ".heldout.txt"
EVAL_OVERLAP = "eval_overlap"  # the reject reason of an instruction too close to a held-out task

SELF_INSTRUCT_FIELDS = {
    "id": ((str, int), False, True),
    "name": (str, False, False),
    "instruction": (str, True, True),
    "instances": (list, True, True),
    "is_classification": (bool, False, False),
}
INSTANCE_FIELDS = {"input": (str, False, False), "output": (str, True, False)}
ALPACA_FIELDS = {"instruction": (str, True, True), "input": (str, False, False), "output": (str, True, False),
                 "is_classification": (bool, False, False)}


@dataclass(frozen=True)
class Instance:
    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    instances: tuple[Instance, ...]
    is_classification: bool = False
    name: str = ""
    language: str = field(default="en")


def load_seeds(path=DEFAULT_SEEDS) -> list[SeedTask]:
    """All seed tasks in `path`, in file order; raises InputError on the first bad line."""
    path = Path(path)
    tasks: list[SeedTask] = []
    by_instruction: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for line, record in read_records(path):
        if "instances" in record:
            task = _self_instruct_task(record, path, line)
        else:
            task = _alpaca_task(record, path, line)
            if task.instruction in by_instruction:  # Alpaca lines sharing an instruction: one task
                i = by_instruction[task.instruction]
                old = tasks[i]
                tasks[i] = SeedTask(old.id, old.instruction, old.instances + task.instances,
                                    old.is_classification, old.name, old.language)
                continue
        if task.id in seen_ids:
            raise InputError(path, line, "id", f"duplicate id {task.id!r} (first on line {seen_ids[task.id]})")
        seen_ids[task.id] = line
        by_instruction[task.instruction] = len(tasks)
        tasks.append(task)
    if not tasks:
        raise UserError(f"{path}: no seed tasks (the file is empty)")
    return tasks


def _self_instruct_task(record: dict, path, line: int) -> SeedTask:
    check_fields(record, SELF_INSTRUCT_FIELDS, path, line)
    instances = []
    for i, instance in enumerate(record["instances"]):
        try:
            check_fields(instance, INSTANCE_FIELDS, path, line)
        except InputError as e:
            raise InputError(path, line, f"instances[{i}].{e.field}" if e.field else f"instances[{i}]", e.problem) from None
        instances.append(Instance(instance.get("input") or "", instance["output"]))
    task_id = str(record.get("id", f"seed_task_{line - 1}"))
    instruction = record["instruction"].strip()
    return SeedTask(task_id, instruction, tuple(instances), bool(record.get("is_classification", False)),
                    record.get("name", ""), language_of(instruction))


def _alpaca_task(record: dict, path, line: int) -> SeedTask:
    check_fields(record, ALPACA_FIELDS, path, line)
    instruction = record["instruction"].strip()
    return SeedTask(str(record.get("id", f"seed_task_{line - 1}")), instruction,
                    (Instance(record.get("input") or "", record["output"]),),
                    bool(record.get("is_classification", False)), "", language_of(instruction))


def instance_records(tasks: list[SeedTask]) -> list[dict]:
    """One Alpaca record per seed instance: the human-written demonstrations as training or test data.

    `task_id` names the task, so finetune's split and eval's breakdowns can keep a task's
    instances together."""
    return [{"id": f"{task.id}#{i}", "instruction": task.instruction, "input": instance.input,
             "output": instance.output, "is_classification": task.is_classification, "source": "seed",
             "task_id": task.id}
            for task in tasks for i, instance in enumerate(task.instances)]


def is_seed_file(path) -> bool:
    """Whether `path` holds Self-Instruct seed tasks (records with `instances`), judged by its first record."""
    first = next((record for _, record in read_records(path)), None)
    return first is not None and "instances" in first


# --------------------------------------------------------------------------- held-out tasks


@dataclass(frozen=True)
class SeedSplit:
    """The seed tasks as `(train, heldout)`: held-out ones are for evaluation only."""

    train: list[SeedTask]
    heldout: list[SeedTask]

    @property
    def heldout_ids(self) -> set[str]:
        return {task.id for task in self.heldout}


def heldout_path_for(seeds_path) -> Path:
    """The held-out list beside a seed file: `seed_tasks.jsonl` -> `seed_tasks.heldout.txt`."""
    path = Path(seeds_path)
    return path.with_name(path.name.rsplit(".", 1)[0] + HELDOUT_SUFFIX)


def read_heldout_ids(path, known_ids: set[str]) -> list[str]:
    """The ids listed in `path`, one a line (blank lines and `#` comments skipped); each must be a seed id."""
    ids: list[str] = []
    for line, text in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        task_id = text.split("#", 1)[0].strip()
        if not task_id:
            continue
        if task_id not in known_ids:
            raise InputError(path, line, "id", f"{task_id!r} is not a task of the seed file beside it")
        ids.append(task_id)
    return ids


def split_seeds(tasks: list[SeedTask], heldout_ids: set[str]) -> SeedSplit:
    return SeedSplit([t for t in tasks if t.id not in heldout_ids], [t for t in tasks if t.id in heldout_ids])


def heldout_ids_for(seeds_path, tasks: list[SeedTask]) -> set[str]:
    """The held-out ids listed beside `seeds_path` (none without a list), checked against `tasks`."""
    listed = heldout_path_for(seeds_path)
    return set(read_heldout_ids(listed, {t.id for t in tasks})) if listed.is_file() else set()


def load_seed_split(path=DEFAULT_SEEDS) -> SeedSplit:
    """The seed tasks of `path`, split by the held-out list beside it (none held out without one)."""
    tasks = load_seeds(path)
    return split_seeds(tasks, heldout_ids_for(path, tasks))


class HeldoutGuard:
    """Decontamination: finds instructions too close to a held-out task, for `filter` and `generate`.

    Too close means the same text after `fold_width_case_space`, or a ROUGE-L F1 above the
    stage's near-duplicate threshold on its tokens: the very rule that makes two instructions
    one task in the pool, so nothing trained on is the same task as one evaluated as unseen.
    """

    def __init__(self, heldout: list[SeedTask], threshold: float, tokenizer: str = "multilingual"):
        from pipeline.heuristics import fold_width_case_space
        from pipeline.similarity import RougeIndex

        self._fold = fold_width_case_space
        self.threshold = threshold
        self.by_id = {task.id: task for task in heldout}
        self.by_form = {fold_width_case_space(task.instruction): task for task in heldout}
        self.index = RougeIndex(threshold, tokenizer)
        for task in heldout:
            self.index.add(task.id, task.instruction)

    def overlaps(self, texts: list[str]) -> list[tuple[float, SeedTask] | None]:
        """Per text, `(score, held-out task)` when it is too close to one, else None."""
        if not self.by_id:
            return [None] * len(texts)
        out: list[tuple[float, SeedTask] | None] = []
        for text, (score, best) in zip(texts, self.index.best_matches(list(texts))):
            copy = self.by_form.get(self._fold(text))
            if copy is not None:
                out.append((1.0, copy))
            elif best is not None and score > self.threshold:
                out.append((score, self.by_id[best]))
            else:
                out.append(None)
        return out


def _stratum(task: SeedTask) -> tuple[str, bool]:
    return task.language, task.is_classification


def heldout_count(size: int, fraction: float = HELDOUT_FRACTION) -> int:
    """How many of a stratum's `size` tasks are held out: the fraction, rounded half up."""
    return math.floor(size * fraction + 0.5)


def choose_heldout(tasks: list[SeedTask], fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED) -> list[str]:
    """Ids of a seeded `fraction` of `tasks`, stratified by language and classification, in file order.

    Each stratum (e.g. Japanese classification) gives its own rounded share, drawn with a
    generator seeded by `seed` and the stratum, so adding a task to one stratum leaves the
    others' choice unchanged.
    """
    strata: dict[tuple[str, bool], list[SeedTask]] = {}
    for task in tasks:
        strata.setdefault(_stratum(task), []).append(task)
    chosen: set[str] = set()
    for (language, classification), members in sorted(strata.items()):
        rng = random.Random(f"{seed}:{language}:{classification}")
        chosen.update(t.id for t in rng.sample(members, heldout_count(len(members), fraction)))
    return [t.id for t in tasks if t.id in chosen]


def write_heldout_file(seeds_path, fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED) -> Path:
    """Write the seeded held-out list beside `seeds_path`, with a header saying how it was made."""
    from pipeline.jsonl import atomic_write

    tasks = load_seeds(seeds_path)
    by_id = {t.id: t for t in tasks}
    out = heldout_path_for(seeds_path)
    with atomic_write(out) as f:
        f.write(f"# Unseen tasks for `eval --data heldout`: kept out of generate's and respond's examples and of mix.\n"
                f"# {fraction:.0%} of each language x classification stratum of {Path(seeds_path).name}, seed {seed}.\n"
                f"# Edit freely: one seed id a line; text after # is a comment.\n")
        for task_id in choose_heldout(tasks, fraction, seed):
            task = by_id[task_id]
            kind = "classification" if task.is_classification else "generation"
            f.write(f"{task_id}  # {task.language} {kind}: {task.name or task.instruction[:40]}\n")
    return out


if __name__ == "__main__":
    print(write_heldout_file(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SEEDS))
