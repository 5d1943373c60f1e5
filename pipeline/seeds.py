"""Seed tasks: the few hundred human-written tasks everything is bootstrapped from.

Reads the Self-Instruct format (`id, name, instruction, instances: [{input, output}],
is_classification`) and the Alpaca format (`instruction, input, output`, one instance per
line; lines with the same instruction become one task), validated line by line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError, UserError
from pipeline.jsonl import check_fields, read_records
from pipeline.lang import language_of

DEFAULT_SEEDS = "seeds/seed_tasks.jsonl"

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
    """One Alpaca record per seed instance: the human-written demonstrations as training or test data."""
    return [{"id": f"{task.id}#{i}", "instruction": task.instruction, "input": instance.input,
             "output": instance.output, "is_classification": task.is_classification, "source": "seed"}
            for task in tasks for i, instance in enumerate(task.instances)]


def is_seed_file(path) -> bool:
    """Whether `path` holds Self-Instruct seed tasks (records with `instances`), judged by its first record."""
    first = next((record for _, record in read_records(path)), None)
    return first is not None and "instances" in first
