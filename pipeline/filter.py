"""Drop near-duplicate instructions by ROUGE-L against the seeds and each other (Self-Instruct, step 2).

Not built yet (issue 3): the stage validates its input, then says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt
from pipeline.jsonl import INSTRUCTION_FIELDS, check_output_path, load_records


@dataclass(frozen=True)
class Config:
    in_path: str = option("data/machine_instructions.jsonl", "generated instructions to filter", flag="--in")
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks; they start the pool")
    out: str = option("data/filtered_instructions.jsonl", "the kept instructions")
    threshold: float = option(0.7, "drop a candidate whose highest ROUGE-L F1 against the pool is above this")


def run(cfg: Config):
    load_records(cfg.in_path, INSTRUCTION_FIELDS)
    check_output_path(cfg.out, "--out")
    raise StageNotBuilt("`filter` is not built yet (issue 3); nothing was written")
