"""Supervised fine-tuning with cross-entropy on the response tokens.

Not built yet (issue 7): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    data: str = option("data/alpaca_data.jsonl", "training records (Alpaca JSONL)")
    output_dir: str = option("runs/sft", "where the model, metrics and plots go")


def run(cfg: Config):
    raise StageNotBuilt("`finetune` is not built yet (issue 7); nothing was written")
