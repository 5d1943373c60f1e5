"""eval.md: the table of base against tuned, the breakdowns, the judged comparison, and one line
defining each measure in the explainer's terms. `eval` computes the numbers; this only writes them."""

from __future__ import annotations

ROUGE_KEYS = tuple(f"{name}{part}" for name in ("rouge_1", "rouge_2", "rouge_l") for part in ("", "_precision", "_recall"))
METRIC_ORDER = ("loss", "perplexity", "token_accuracy", "sequence_accuracy", "exact_match", "label_accuracy",
                "bleu", "chrf") + ROUGE_KEYS
# What each measure is, one line each under the eval.md tables.
METRIC_DEFINITIONS = {
    "loss": "mean cross-entropy (nats) of the reference answer's tokens, teacher-forced, token-weighted",
    "perplexity": "exp(loss)",
    "token_accuracy": "share of the reference answer's tokens that are the model's top prediction, teacher-forced",
    "sequence_accuracy": "share of answers that are the reference token for token, ending where it ends (strict; "
                         "with --predictions: the same text once the ends are stripped)",
    "exact_match": "share of answers equal to the reference after normalising: NFKC, whitespace, no space beside "
                   "Japanese, no trailing 。．.!！ (「３６００円。」 = 「3600円」)",
    "label_accuracy": "classification records only: share whose answer is the reference label (as exact_match)",
    "bleu": "sacrebleu corpus BLEU, 0-100: n-gram precision of the answers, with a brevity penalty, pooled over "
            "records; tokenizers: {tokenizers}",
    "chrf": "sacrebleu corpus chrF, 0-100: character 6-gram F-score (beta 2), no tokenizer, so the same in every language",
    "rouge_1": "mean ROUGE-1 F1: shared words (English) or characters (Japanese) between answer and reference",
    "rouge_2": "mean ROUGE-2 F1: the same on pairs of adjacent tokens",
    "rouge_l": "mean ROUGE-L F1: the longest common subsequence of tokens (pipeline.similarity's ROUGE-L)",
    "_precision": "of the answer's tokens (n-grams, LCS), the share found in the reference",
    "_recall": "of the reference's, the share found in the answer: ROUGE as first defined, recall of the reference",
}
# The measures each breakdown table shows (eval.json has them all).
SLICE_TABLE_KEYS = ("token_accuracy", "sequence_accuracy", "exact_match", "label_accuracy", "chrf", "rouge_l")
LOWER_IS_BETTER = {"loss", "perplexity"}


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    if metric.startswith(("bleu", "chrf")) or metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.4f}"


def _row(cells: list[str], key: str, tuned: dict, base: dict | None) -> str:
    b = base.get(key) if base else None
    t = tuned.get(key)
    delta = "—" if b is None or t is None else ("+" if t - b >= 0 else "") + _format(key, t - b)
    return "| " + " | ".join(cells + [_format(key, b), _format(key, t), delta]) + " |"


def _ordered(keys) -> list[str]:
    keys = set(keys)
    return [k for k in METRIC_ORDER if k in keys] + sorted(keys - set(METRIC_ORDER))


def markdown_report(result: dict, names: dict, title: list[str], judge_name: str, tokenizers: dict[str, str]) -> str:
    """The table metric | base | tuned | delta, the breakdown tables, then what each measure means.

    `title`: the report's first lines; `judge_name`: who judged, for the judged section."""
    tuned, base = result["metrics"], result.get("baseline")
    lines = title + [f"base: {names['base'] or '(none)'}  ", f"tuned: {names['tuned']}", "",
                                       "| metric | base | tuned | delta |", "| --- | ---: | ---: | ---: |"]
    keys = _ordered({*tuned, *(base or {})})
    for key in keys:
        name = f"{key} (lower is better)" if key in LOWER_IS_BETTER else key
        lines.append(_row([name], key, tuned, base))
    for dimension, slices in result["breakdown"].items():
        lines += ["", f"## By {dimension}", "", f"| {dimension} | records | measure | base | tuned | delta |",
                  "| --- | ---: | --- | ---: | ---: | ---: |"]
        for value, entry in slices.items():
            shown = [k for k in SLICE_TABLE_KEYS if k in entry["tuned"] or k in entry.get("baseline", {})]
            for n, key in enumerate(shown):
                first = n == 0
                lines.append(_row([value if first else "", str(entry["records"]) if first else "", key],
                                  key, entry["tuned"], entry.get("baseline")))
    if "judge" in result:
        lines += judge_lines(result["judge"], judge_name)
    lines.append("")
    lines += definition_lines(keys, tokenizers, result["counts"])
    return "\n".join(lines) + "\n"


def judge_lines(judge: dict, judge_name: str) -> list[str]:
    """The judged comparison: counts and rates, each with what it means."""
    lines = ["", f"## Judged: tuned against base ({judge_name}, both orders)", "",
             f"wins {judge['wins']}, ties {judge['ties']}, losses {judge['losses']} of {judge['compared']}"
             f" ({judge['unread']} unread)", ""]
    if "win_rate" in judge:
        lines += [f"- win_rate: {judge['win_rate']:.4f}: (wins + ties / 2) / verdicts read; 0.5 is no difference",
                  f"- flip_rate: {judge['flip_rate']:.4f}: share of verdicts that followed the order the answers were "
                  f"shown in (position bias, counted as ties)"]
    for side, score in judge.get("reference_score", {}).items():
        lines.append(f"- reference_score {side}: {score:.2f}: mean 1-5 score with the reference answer shown to the judge")
    return lines


def definition_lines(keys: list[str], tokenizers: dict[str, str], counts: dict) -> list[str]:
    """One line per measure in the tables, in the terms of the explainer."""
    named = ", ".join(f"{lang} {name}" for lang, name in tokenizers.items())
    shown = set(keys) | {"label_accuracy"}
    lines = [f"- {key}: {METRIC_DEFINITIONS[key].format(tokenizers=named)}" for key in METRIC_ORDER
             if key in shown and key in METRIC_DEFINITIONS]
    if any(key.endswith(("_precision", "_recall")) for key in keys):
        lines += [f"- rouge_*{part}: {METRIC_DEFINITIONS[part]}" for part in ("_precision", "_recall")]
    lines += ["", f"References: records with the same instruction and input answer the same question, so each is "
                  f"scored against all their outputs and takes the best ({counts['with_several_references']} of "
                  f"{counts['records']} records had several).",
              "Slices: a measure with nothing to score in a slice is absent (—), never 0; the kind `classification` "
              "shows label_accuracy only. eval.json `breakdown` holds every measure of every slice.",
              "Fractions are 0-1 except perplexity and the 0-100 bleu and chrf."]
    return lines
