"""Judged comparison for `eval`: the tuned model's answer against the base model's on every
record, by an LLM judge, so an answer worded differently from the reference can still win.

    python -m pipeline eval --model runs/sft --baseline SmolLM2-135M-Instruct --data heldout \\
        --judge-backend openai --judge-model gpt-4o-mini

- Pairwise, both orders (`pipeline.judging.pairwise_verdicts`): the judge sees (tuned, base)
  and (base, tuned). A preference that holds in both orders is a win or a loss; one that
  follows the position (the first shown wins both times) is a tie and counts as a flip, so a
  judge with position bias gives ties, never a false win (Zheng et al. 2023, MT-Bench).
- `win_rate` = (wins + ties / 2) / verdicts read: 0.5 means no difference. A verdict whose
  reply could not be read in either order is counted in `unread` and left out of the rate.
- `flip_rate`: the share of verdicts read whose preference changed with the order: how much of
  the judge's opinion is position bias.
- `reference_score`: each model's mean 1-5 score from the pointwise rubric with the reference
  answer shown (`pipeline.judging.judge_items`), over the answers the judge scored.

The judge sits below the eval stage and imports no stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from statistics import fmean

from pipeline.judging import JudgeItem, JudgeSettings, Pair, Verdict, flip_share, judge_items, pairwise_verdicts

SIDES = ("tuned", "base")
WINNER_NAMES = {"a": "tuned", "b": "base", "tie": "tie"}  # the pair's answer_a is always the tuned model's


@dataclass(frozen=True)
class Compared:
    """One record's two answers and what the judge is told about the task."""

    key: str
    instruction: str
    input: str
    reference: str
    tuned: str
    base: str
    language: str = ""


@dataclass
class Comparison:
    summary: dict
    per_record: dict[str, dict]  # key -> {"winner", "flipped", "tuned_score", "base_score"}


def compare(client, items: list[Compared], settings: JudgeSettings) -> Comparison:
    """Pairwise verdicts in both orders and reference-guided scores for every item."""
    pairs = [Pair(item.key, item.instruction, item.tuned, item.base, item.input, item.reference, item.language)
             for item in items]
    with progress(len(pairs), "judge: pairwise, both orders", "pair") as bar:
        verdicts: dict[str, Verdict] = {}
        for pair, verdict in pairwise_verdicts(client, pairs, settings):
            verdicts[pair.key] = verdict
            bar.update(1)
    per_record = {item.key: {"winner": WINNER_NAMES.get(verdicts[item.key].winner) if item.key in verdicts else None,
                             "flipped": verdicts[item.key].flipped if item.key in verdicts else False}
                  for item in items}
    scores = reference_scores(client, items, settings)
    for (side, key), score in scores.items():
        per_record[key][f"{side}_score"] = score
    return Comparison(summarize(list(verdicts.values()), len(items), scores), per_record)


def reference_scores(client, items: list[Compared], settings: JudgeSettings) -> dict[tuple[str, str], float | None]:
    """(side, key) -> the pointwise 1-5 score of that side's answer, judged against the reference."""
    judged = [JudgeItem(f"{side}\x00{item.key}", item.instruction, getattr(item, side), item.input, item.reference,
                        item.language) for item in items for side in SIDES]
    out: dict[tuple[str, str], float | None] = {}
    with progress(len(judged), "judge: scores against the reference", "answer") as bar:
        for judge_item, judgement in judge_items(client, judged, settings):
            side, key = judge_item.key.split("\x00", 1)
            out[(side, key)] = judgement.score
            bar.update(1)
    return out


def progress(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr)


def summarize(verdicts: list[Verdict], compared: int, scores: dict[tuple[str, str], float | None]) -> dict:
    """The counts and rates of the module doc; a rate with nothing to count is absent, never 0."""
    read = [v for v in verdicts if v.winner is not None]
    wins = sum(v.winner == "a" for v in read)
    losses = sum(v.winner == "b" for v in read)
    ties = len(read) - wins - losses
    summary: dict = {"compared": compared, "wins": wins, "ties": ties, "losses": losses, "unread": compared - len(read)}
    if read:
        summary["win_rate"] = (wins + ties / 2) / len(read)
        summary["flip_rate"] = flip_share(read)
    means = {}
    for side in SIDES:
        values = [score for (s, _), score in scores.items() if s == side and score is not None]
        if values:
            means[side] = fmean(values)
    if means:
        summary["reference_score"] = means
    return summary
