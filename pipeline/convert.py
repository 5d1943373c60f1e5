"""Turn existing task datasets and dialogue logs into instruction data.

Not built yet (issue 10): the stage says so and exits 2.
"""

from dataclasses import dataclass

from pipeline.config import option
from pipeline.errors import StageNotBuilt


@dataclass(frozen=True)
class Config:
    kind: str = option("qa", "qa, translation, classification, summarization or dialogue")


def run(cfg: Config):
    raise StageNotBuilt("`convert` is not built yet (issue 10); nothing was written")
