"""Write inputs and outputs for every kept instruction, as Alpaca JSONL (Self-Instruct, step 3).

Not built yet (issue 6): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    in_path: str = option("data/filtered_instructions.jsonl", "kept instructions from `filter`", flag="--in")
    out: str = option("data/alpaca_data.jsonl", "training records, appended as they are written")


def run(cfg: Config):
    raise StageNotBuilt("`respond` is not built yet (issue 6); nothing was written")
