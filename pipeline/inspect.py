"""Summarise any stage's JSONL: counts, lengths, leading verbs, similarity histogram, HTML report.

Not built yet (issue 9): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    file: str = option("data/alpaca_data.jsonl", "the JSONL file to inspect", positional=True)


def run(cfg: Config):
    raise StageNotBuilt("`inspect` is not built yet (issue 9); nothing was written")
