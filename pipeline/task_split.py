"""finetune's validation split by task: every record of one task falls on one side.

A random split of records puts a task's other instances, or the same instruction asked with
another input, on both sides (in the demo's split 10 of 17 validation records shared their
instruction with a training record), so validation loss measures memory of the task rather
than how the model does on tasks it has not trained on. Here a task is:

- a seed task's `task_id` (what `pipeline.seeds.instance_records` writes), else
- the instruction (Alpaca records: `respond`'s K instances of one instruction are one task), else
- the first user turn of a chat record.

Whole tasks are drawn in a seeded random order until the validation side holds the asked share
of records (rounded, at least one task when a share is asked and there are two tasks; never
every task). `--val-split records` keeps the record-level split of `pipeline.batching`.
"""

from __future__ import annotations

import random

VAL_SPLITS = ("tasks", "records")


def task_key(record: dict) -> str:
    """What makes records one task (see the module doc)."""
    if record.get("task_id") is not None:
        return f"task:{record['task_id']}"
    if "messages" in record:
        first = next((t.get("content", "") for t in record["messages"] if t.get("role") == "user"), "")
        return f"chat:{first.strip()}"
    return f"instruction:{str(record.get('instruction', '')).strip()}"


def split_by_task(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """`(train, validation)` in input order, no task on both sides (module doc)."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(task_key(record), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    wanted = round(len(records) * val_fraction)
    chosen: set[int] = set()
    for n, key in enumerate(keys):
        if n == len(keys) - 1:  # the training side keeps at least one task
            break
        if len(chosen) >= wanted and not (val_fraction > 0 and not chosen):
            break
        chosen.update(groups[key])
    return ([r for i, r in enumerate(records) if i not in chosen],
            [r for i, r in enumerate(records) if i in chosen])
