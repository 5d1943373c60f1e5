"""Precision and recall of Japanese near-duplicate rules on a labelled pair set.

    .venv/bin/python bench/bench_ja_pairs.py [tests/fixtures/ja_near_duplicates.jsonl] [--show-errors]

Each line of the set is {"a", "b", "label": "near_duplicate" | "distinct", "why", "set"}: `tuning`
pairs were written before any rule was tried and the rule was chosen on them; `held_out` pairs
were written after, and no rule was changed on them. A rule calls
a pair a near-duplicate when ROUGE-L F1 of its tokens is above the filter's default threshold.
Rows: the rule in use (`multilingual`), the old one-token-per-character rule (`characters`),
and the alternatives measured while choosing (pipeline/ja_tokens.py's docstring has the table).
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ja_tokens import _bigrams, _JAPANESE_RE, japanese_tokens, sentences, strip_frame  # noqa: E402
from pipeline.similarity import NEAR_DUPLICATE_THRESHOLD, _multilingual, rouge_l, tokenize  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ja_near_duplicates.jsonl"


def _stripped_surfaces(text: str) -> list[list[tuple]]:
    text = unicodedata.normalize("NFKC", text).lower()
    parsed = sentences(text)
    return [strip_frame(s, i == 0) for i, s in enumerate(parsed)] if any(strip_frame(s, i == 0) for i, s in enumerate(parsed)) \
        else parsed


def characters_stripped(text: str) -> list[str]:
    return [t for s in _stripped_surfaces(text) for m in s for t in _multilingual().findall(m[0])]


def bigrams_stripped(text: str) -> list[str]:
    """Surface characters (no readings) in bigrams over each run of Japanese morphemes."""
    out, run = [], []
    for sentence in _stripped_surfaces(text):
        for surface, pos, _, _ in sentence + [("", "記号", "", "")]:  # a symbol ends the last run
            if pos != "記号" and _JAPANESE_RE.search(surface):
                run.append(surface)
                continue
            out += _bigrams("".join(run)) if run else []
            run = []
            out += _multilingual().findall(surface)
    return out


def words_stripped(text: str) -> list[str]:
    return [m[0] for s in _stripped_surfaces(text) for m in s if m[1] != "記号"]


RULES = {
    "readings in bigrams, frame stripped (multilingual)": lambda t: tokenize(t, "multilingual"),
    "one token per character (characters, the old rule)": lambda t: tokenize(t, "characters"),
    "readings in bigrams, frame kept": lambda t: japanese_tokens(unicodedata.normalize("NFKC", t).lower(),
                                                                 _multilingual().findall, strip=False),
    "per character, frame stripped": characters_stripped,
    "surface bigrams, frame stripped": bigrams_stripped,
    "MeCab words, frame stripped": words_stripped,
}


def measure(rows: list[dict], tokens, threshold: float) -> tuple[float, float, list]:
    tp = fp = fn = 0
    errors = []
    for row in rows:
        score = rouge_l(tokens(row["a"]), tokens(row["b"]))
        said, near = score > threshold, row["label"] == "near_duplicate"
        tp, fp, fn = tp + (said and near), fp + (said and not near), fn + (near and not said)
        if said != near:
            errors.append((round(score, 3), row["label"], row["a"], row["b"]))
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), errors


def main(argv: list[str]) -> None:
    path = next((a for a in argv if not a.startswith("--")), str(FIXTURE))
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    threshold = NEAR_DUPLICATE_THRESHOLD
    near = sum(r["label"] == "near_duplicate" for r in rows)
    print(f"{len(rows)} pairs ({near} near-duplicates, {len(rows) - near} distinct), threshold {threshold}")
    sets = sorted({r.get("set", "all") for r in rows}, reverse=True)
    print(f"  {'rule':<52} " + "  ".join(f"{name + ' P / R':>20}" for name in sets + ["all"]))
    for name, tokens in RULES.items():
        cells, all_errors = [], []
        for subset in sets + ["all"]:
            chosen = [r for r in rows if subset in ("all", r.get("set", "all"))]
            precision, recall, errors = measure(chosen, tokens, threshold)
            cells.append(f"{precision:.3f} / {recall:.3f}")
            all_errors = errors
        print(f"  {name:<52} " + "  ".join(f"{cell:>20}" for cell in cells))
        if "--show-errors" in argv:
            for error in all_errors:
                print(f"      {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
