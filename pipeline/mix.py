"""Combine instruction files with weights, deduplicated across sources.

Not built yet (issue 10): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    out: str = option("data/train.jsonl", "the combined training file")


def run(cfg: Config):
    raise StageNotBuilt("`mix` is not built yet (issue 10); nothing was written")
