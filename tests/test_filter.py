"""The filter stage: heuristics, the greedy ROUGE-L rule against a rouge_score reference, files and errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from rouge_score import rouge_scorer, tokenizers

from pipeline.cli import main
from pipeline.errors import InputError, UserError
from pipeline.filter import Config, filter_instructions
from pipeline.seeds import load_seeds
from tests.conftest import OurTokens, rouge_score_best_earlier, write_jsonl

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
REPO = Path(__file__).resolve().parents[1]


def seed_records(instructions: list[str]) -> list[dict]:
    return [{"id": f"seed_task_{i}", "name": f"t{i}", "instruction": text,
             "instances": [{"input": "", "output": "ok"}], "is_classification": False}
            for i, text in enumerate(instructions)]


def seeds_file(tmp_path: Path, instructions: list[str]) -> Path:
    return write_jsonl(tmp_path / "seeds.jsonl", seed_records(instructions))


# --- the core ----------------------------------------------------------------------------

def test_filter_instructions_keeps_fields_and_explains_every_rejection(tmp_path):
    seeds = load_seeds(seeds_file(tmp_path, ["Give three tips for staying healthy.", "次の文章を英語に翻訳してください。"]))
    candidates = [
        {"instruction": "Give three tips for staying healthy and happy.", "backend": "fake"},  # near seed 0
        {"id": 7, "instruction": "Explain how photosynthesis works in plants.", "request_id": "r1"},
        {"instruction": "Explain how photosynthesis works in green plants."},  # near the previous one
        {"instruction": "次の文章を英語に翻訳してくだせい。"},  # near seed 1, one character apart
        {"instruction": "Describe the image below in detail."},
        {"instruction": "Give three tips for staying healthy."},
        {"instruction": "List the planets of the solar system in order."},
    ]
    kept, rejected, report = filter_instructions(candidates, seeds, Config())
    assert [r["id"] for r in kept] == ["7", "machine_7"]
    assert kept[0]["request_id"] == "r1" and set(kept[0]) >= {"instruction", "filter_max_rouge_l", "filter_most_similar"}
    by_id = {r["id"]: r for r in rejected}
    assert by_id["machine_1"]["reason"] == "near_duplicate" and by_id["machine_1"]["backend"] == "fake"
    assert by_id["machine_1"]["filter_most_similar"]["id"] == "seed_task_0"
    assert by_id["machine_1"]["filter_max_rouge_l"] > 0.7
    assert by_id["machine_3"]["filter_most_similar"] == {"id": "7", "instruction": candidates[1]["instruction"]}
    assert by_id["machine_4"]["filter_most_similar"]["id"] == "seed_task_1"
    assert by_id["machine_5"]["reason"] == "blacklist" and by_id["machine_5"]["filter_max_rouge_l"] is None
    assert by_id["machine_6"]["reason"] == "seed_copy" and by_id["machine_6"]["filter_max_rouge_l"] == 1.0
    assert report["rejected_by_reason"]["near_duplicate"] == 3
    assert report["input"] == 7 and report["kept"] == 2 and report["rejected"] == 5
    assert sum(report["max_rouge_l_histogram"]["counts"]) == 2
    assert report["max_rouge_l_exact"] == "all"
    assert report["pairs"]["possible"] == report["pairs"]["compared"] + report["pairs"]["pruned"]

    # The anchors' tokenizer sees no tokens in Japanese text, so it never catches the duplicate.
    kept_rouge, _, _ = filter_instructions(candidates, seeds, Config(tokenizer="rouge"))
    assert "machine_4" in [r["id"] for r in kept_rouge]


def test_generate_fields_pass_through_unchanged_beside_the_filters_own(tmp_path):
    seeds = load_seeds(seeds_file(tmp_path, ["Give three tips for staying healthy.", "次の文章を英語に翻訳してください。"]))
    generated = {"max_rouge_l": 0.25, "most_similar": "seed_task_0", "most_similar_instruction": "Give three tips...",
                 "request_id": "r1"}
    candidates = [
        {"id": "machine_000000", "instruction": "Explain how photosynthesis works in plants.", **generated},
        {"id": "machine_000001", "instruction": "次の文章を英語に翻訳してくだせい。", **generated},  # near seed 1
        {"id": "machine_000002", "instruction": "Describe the image below in detail.", **generated},  # blacklist
    ]
    kept, rejected, _ = filter_instructions(candidates, seeds, Config())
    for record in kept + rejected:
        assert {key: record[key] for key in generated} == generated  # generate's meaning and type kept
        assert "filter_max_rouge_l" in record and "filter_most_similar" in record
    assert [r["id"] for r in kept] == ["machine_000000"]
    assert (kept[0]["filter_max_rouge_l"], kept[0]["filter_most_similar"]) == (0.0, None)  # no token shared with a seed
    by_id = {r["id"]: r for r in rejected}
    assert by_id["machine_000001"]["filter_most_similar"] == {"id": "seed_task_1", "instruction": "次の文章を英語に翻訳してください。"}
    assert by_id["machine_000002"]["filter_most_similar"] is None


def test_kept_scores_are_exact_when_affordable_and_lower_bounds_otherwise(tmp_path):
    seeds = load_seeds(seeds_file(tmp_path, ["Name three animals that live in the ocean."]))
    candidates = [{"instruction": "Name some large animals that live in a desert."},
                  {"instruction": "List three plants that live in a desert climate."}]
    exact, _, report = filter_instructions(candidates, seeds, Config())
    assert report["max_rouge_l_exact"] == "all"
    assert [r["filter_most_similar"]["id"] for r in exact] == ["seed_task_0", "machine_1"]
    assert exact[0]["filter_max_rouge_l"] == pytest.approx(2 * 5 / (8 + 9))  # LCS "name animals that live in"
    assert exact[1]["filter_max_rouge_l"] == pytest.approx(2 * 5 / (9 + 9))  # LCS "that live in a desert"
    bounded, _, report = filter_instructions(candidates, seeds, Config(exact_scores_limit=0))
    assert report["max_rouge_l_exact"] != "all"
    assert [r["id"] for r in bounded] == [r["id"] for r in exact]
    for low, high in zip(bounded, exact):
        assert low["filter_max_rouge_l"] <= high["filter_max_rouge_l"]


JAPANESE_STEMS = ["日本の首都について説明", "猫が好きな理由を三つ挙げ", "次の文章を英語に翻訳", "春に咲く花の名前を五つ書き",
                  "富士山の高さを答え", "この俳句の季語を指摘し", "東京から大阪までの行き方を教え", "味噌汁の作り方を説明し"]


@pytest.mark.parametrize("tokenizer", ["rouge", "multilingual"])
def test_kept_exact_scores_are_rouge_scores_against_the_pool_before_each(tokenizer, tmp_path):
    # Many candidates are dropped (heuristics and near duplicates): a kept record's exact best is
    # over the pool before it (seeds and earlier kept records), never over a dropped candidate.
    seeds, candidates = identity_records("synthetic")
    seeds, candidates = seeds[:40], candidates[:260]
    rng = random.Random(5)
    for stem in JAPANESE_STEMS:  # Japanese requests, some near copies of one another
        candidates.insert(rng.randrange(len(candidates)), f"{stem}てください。")
        candidates.insert(rng.randrange(len(candidates)), f"{stem}て下さい。")
    candidates += ["Describe the picture below.", "a b"]  # blacklist and too_short
    records = [{"id": f"c{i}", "instruction": text} for i, text in enumerate(candidates)]
    seed_tasks = load_seeds(seeds_file(tmp_path, seeds))
    # The pool fits the default limit: one pass decides and scores every pair.
    kept, rejected, report = filter_instructions(records, seed_tasks, Config(tokenizer=tokenizer))
    assert report["max_rouge_l_exact"] == "all"
    assert {r["reason"] for r in rejected} >= {"near_duplicate", "blacklist", "too_short"} and len(rejected) > 60

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=OurTokens(tokenizer))
    pool = [(task.id, task.instruction) for task in seed_tasks] + [(r["id"], r["instruction"]) for r in kept]
    expected = rouge_score_best_earlier([text for _, text in pool], scorer)[len(seed_tasks):]
    for record, (best, nearest) in zip(kept, expected):
        most_similar = dict(zip(("id", "instruction"), pool[int(nearest[1:])])) if nearest else None
        assert (record["filter_max_rouge_l"], record["filter_most_similar"]) == (best, most_similar), record["id"]
    if tokenizer == "multilingual":
        assert any(r["instruction"].endswith("て下さい。") and r["reason"] == "near_duplicate" for r in rejected)

    # A limit of exactly the pool's size (more candidates than that): the index decides, then the
    # kept ones are rescored; every record comes out the same, the rejected ones' scores too.
    limit = len(seeds) + len(kept)
    again, rejected_again, report = filter_instructions(records, seed_tasks,
                                                        Config(tokenizer=tokenizer, exact_scores_limit=limit))
    assert report["max_rouge_l_exact"] == "all" and again == kept and rejected_again == rejected


# --- identity with the rouge_score reference ------------------------------------------------

def perturb(words: list[str], vocabulary: list[str], rng: random.Random) -> list[str]:
    """1-4 word edits: enough to land many pairs on either side of 0.7."""
    words = list(words)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.35 and len(words) > 1:
            del words[rng.randrange(len(words))]
        elif op < 0.7:
            words.insert(rng.randint(0, len(words)), rng.choice(vocabulary))
        else:
            words[rng.randrange(len(words))] = rng.choice(vocabulary)
    return words


def identity_records(source: str) -> tuple[list[str], list[str]]:
    """(seed instructions, candidate instructions): real or synthetic ASCII text, half perturbed copies."""
    rng = random.Random(3)
    if source == "alpaca":
        texts = [r["instruction"] for r in json.loads(ALPACA.read_text(encoding="utf-8"))]
        texts = [t for t in texts if t.isascii() and 4 <= len(t.split()) <= 40][:900]
    else:
        nouns = ["cat", "river", "poem", "city", "number", "story", "recipe", "planet", "email", "song"]
        verbs = ["write", "describe", "list", "explain", "compare", "summarize", "translate", "classify"]
        texts = [" ".join([rng.choice(verbs), "a"] + rng.choices(nouns + ["the", "of", "about", "short"], k=rng.randint(3, 12)))
                 for _ in range(900)]
    vocabulary = sorted({w for t in texts for w in t.split()})
    seeds, base = texts[:100], texts[100:]
    candidates = []
    for text in base:
        candidates.append(text)
        if rng.random() < 0.8:  # a near copy of a recent text or a seed: the pool already holds its source
            source_text = rng.choice(candidates[-20:] + seeds[:5])
            candidates.append(" ".join(perturb(source_text.split(), vocabulary, rng)))
    return seeds, candidates


def reference_kept(seeds: list[str], candidates: list[str], threshold: float = 0.7) -> list[bool]:
    """The anchors' rule, sequential and greedy, every score from rouge_score's RougeScorer.

    To fit a test's time budget it skips a pair only when a bound that needs no LCS already
    shows rouge_score's F1 cannot exceed the threshold: ROUGE-L F1 is 2*LCS/(m+n), and the LCS
    is at most the number of tokens the two share as multisets (an independent Counter check,
    not the index's code). Every other pair is scored by `RougeScorer.score`.
    """
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
    pool = [(text, Counter(tokenizer.tokenize(text))) for text in seeds]
    kept = []
    for text in candidates:
        bag = Counter(tokenizer.tokenize(text))
        m = sum(bag.values())
        keep = True
        for other, other_bag in pool:
            n = sum(other_bag.values())
            shared = sum((bag & other_bag).values())
            if m + n == 0 or 2 * shared / (m + n) < threshold - 1e-9:
                continue
            if scorer.score(other, text)["rougeL"].fmeasure > threshold:
                keep = False
                break
        kept.append(keep)
        if keep:
            pool.append((text, bag))
    return kept


@pytest.fixture(scope="module", params=["alpaca", "synthetic"])
def identity_case(request, tmp_path_factory):
    if request.param == "alpaca" and not ALPACA.exists():
        pytest.skip(f"{ALPACA} is not here (real Alpaca text, never shipped); the synthetic case still runs")
    seeds, candidates = identity_records(request.param)
    return seeds, candidates, reference_kept(seeds, candidates)


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["rouge", "multilingual"])
def test_kept_set_equals_the_sequential_rouge_score_reference(identity_case, tokenizer, tmp_path):
    seeds, candidates, expected = identity_case
    seed_tasks = load_seeds(seeds_file(tmp_path, seeds))
    records = [{"id": f"c{i}", "instruction": text} for i, text in enumerate(candidates)]
    kept, rejected, report = filter_instructions(records, seed_tasks, Config(tokenizer=tokenizer, heuristics=False))
    kept_ids = {r["id"] for r in kept}
    assert [f"c{i}" in kept_ids for i in range(len(candidates))] == expected
    # The data really tests the threshold: many rejections, and many scores close to 0.7 on both sides.
    near = [r["filter_max_rouge_l"] for r in kept + rejected if r["filter_max_rouge_l"] is not None and 0.6 <= r["filter_max_rouge_l"] <= 0.8]
    assert len(rejected) > 200 and len(near) > 200
    assert len(candidates) > 1400


# --- the stage ---------------------------------------------------------------------------

def test_stage_writes_kept_rejected_report_and_config(tmp_path, capsys):
    seeds = seeds_file(tmp_path, ["Give three tips for staying healthy."])
    machine = write_jsonl(tmp_path / "machine.jsonl", [
        {"id": "a", "instruction": "Give three tips for staying healthy and fit."},
        {"id": "b", "instruction": "Explain how photosynthesis works in plants.", "model": "m"},
        {"instruction": "Describe the picture in the attached file."},
    ])
    out = tmp_path / "filtered.jsonl"
    code = main(["filter", "--in", str(machine), "--seeds", str(seeds), "--out", str(out),
                 "--report", str(tmp_path / "report.json"), "--threshold", "0.7", "--tokenizer", "rouge"])
    assert code == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    rejected = [json.loads(line) for line in (tmp_path / "filtered.rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["model"]) for r in kept] == [("b", "m")]
    assert {r["id"]: r["reason"] for r in rejected} == {"a": "near_duplicate", "machine_3": "blacklist"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tokenizer"] == "rouge" and report["threshold"] == 0.7 and report["seconds"]["wall"] > 0
    assert json.loads((tmp_path / "filtered.config.json").read_text())["config"]["tokenizer"] == "rouge"
    printed = capsys.readouterr().out
    assert "near_duplicate" in printed and "blacklist" in printed and "kept" in printed

    assert main(["filter", "--in", str(machine), "--seeds", str(seeds), "--out", str(out), "--no-heuristics"]) == 0
    assert (tmp_path / "filtered.report.json").exists()  # the default report path sits beside --out
    assert len(out.read_text().splitlines()) == 2


def test_bad_input_and_flags_fail_before_writing(tmp_path, capsys):
    seeds = seeds_file(tmp_path, ["Give three tips for staying healthy."])
    out = tmp_path / "filtered.jsonl"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok one here"}, {"text": "no instruction"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: instruction: missing"):
        from pipeline.filter import run
        run(Config(in_path=str(bad), seeds=str(seeds), out=str(out)))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "instruction": "a b c d"}, {"id": "x", "instruction": "e f g h"}])
    assert main(["filter", "--in", str(dup), "--seeds", str(seeds), "--out", str(out)]) == 2
    assert "dup.jsonl:2: id: duplicate id 'x'" in capsys.readouterr().err
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"id": "seed_task_0", "instruction": "a b c d"}])
    assert main(["filter", "--in", str(clash), "--seeds", str(seeds), "--out", str(out)]) == 2
    assert "also a seed id" in capsys.readouterr().err
    with pytest.raises(UserError, match="--threshold"):
        Config(threshold=1.5)
    with pytest.raises(UserError, match="--min-words"):
        Config(min_words=10, max_words=5)
    assert main(["filter", "--in", str(tmp_path / "missing.jsonl"), "--seeds", str(seeds), "--out", str(out)]) == 2
    assert not out.exists()


def test_the_filter_command_never_imports_torch_or_transformers(tmp_path):
    seeds = seeds_file(tmp_path, ["Give three tips for staying healthy."])
    machine = write_jsonl(tmp_path / "machine.jsonl", [{"instruction": "Explain how photosynthesis works in plants."}])
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"assert main(['filter', '--in', {str(machine)!r}, '--seeds', {str(seeds)!r}, '--out', {str(tmp_path / 'f.jsonl')!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
