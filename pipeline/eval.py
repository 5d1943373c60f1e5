"""Loss, token accuracy, exact match, BLEU and ROUGE-L of a model on held-out data.

Not built yet (issue 8): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    model: str = option("runs/sft", "the model to evaluate")
    data: str = option("runs/sft/val.jsonl", "held-out records, or `seeds`")


def run(cfg: Config):
    raise StageNotBuilt("`eval` is not built yet (issue 8); nothing was written")
