"""Self-Instruct pipeline: seed tasks -> generated instructions -> ROUGE-L filter -> responses -> SFT -> eval.

Run `python -m pipeline --help` (or the `self-instruct` console script) for the stages.
"""

__version__ = "0.1.0"
