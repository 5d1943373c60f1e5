"""Bootstrap new instructions from the seed tasks (Self-Instruct, step 1).

Not built yet (issue 5): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks (Self-Instruct or Alpaca JSONL)")
    out: str = option("data/machine_instructions.jsonl", "accepted instructions, appended as they are accepted")
    num_instructions: int = option(100, "stop when this many new instructions are accepted")


def run(cfg: Config):
    raise StageNotBuilt("`generate` is not built yet (issue 5); nothing was written")
