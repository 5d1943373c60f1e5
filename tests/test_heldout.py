"""Held-out seed tasks end to end: the seeded, stratified list; never an example in generate or
respond, never mixed into training; decontamination (`eval_overlap`) in filter and generate;
`eval --data heldout` scores them as unseen tasks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline import eval as ev
from pipeline import filter as filter_stage
from pipeline import generate, mix, respond
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.seeds import (DEFAULT_SEEDS, EVAL_OVERLAP, HELDOUT_FRACTION, SeedTask, Instance, choose_heldout, heldout_count,
                            heldout_path_for, load_seed_split, load_seeds, read_heldout_ids)
from tests.conftest import write_jsonl
from tests.fakes import FakeClient

ROOT = Path(__file__).resolve().parent.parent

# Two training and two held-out tasks in each language; the held-out ones are what no stage may leak.
SEEDS = [
    {"id": "t_poem", "instruction": "Write a short poem about the autumn wind.", "is_classification": False,
     "instances": [{"input": "", "output": "Leaves drift on the cold wind."}]},
    {"id": "t_sent", "instruction": "Classify the sentiment of the review as positive or negative.", "is_classification": True,
     "instances": [{"input": "I loved it.", "output": "positive"}]},
    {"id": "h_bakery", "instruction": "Suggest five names for a small bakery that sells sourdough bread.", "is_classification": False,
     "instances": [{"input": "", "output": "Rise & Crumb, The Sour Loaf, Crust Lane, Starter Co., Dough Bros."}]},
    {"id": "h_spam", "instruction": "Decide whether the email is spam or not spam.", "is_classification": True,
     "instances": [{"input": "You won a prize! Click now.", "output": "spam"}, {"input": "Lunch at noon?", "output": "not spam"}]},
    {"id": "t_ja_tr", "instruction": "次の文を英語に翻訳してください。", "is_classification": False,
     "instances": [{"input": "吾輩は猫である。", "output": "I am a cat."}]},
    {"id": "t_ja_cls", "instruction": "次の文の感情を肯定か否定に分類してください。", "is_classification": True,
     "instances": [{"input": "とても楽しかった。", "output": "肯定"}]},
    {"id": "h_ja_mail", "instruction": "取引先へ納品の遅れをお詫びするメールを書いてください。", "is_classification": False,
     "instances": [{"input": "", "output": "いつもお世話になっております。納品が遅れており、誠に申し訳ございません。"}]},
    {"id": "h_ja_fact", "instruction": "次の文が事実か意見かを判定してください。", "is_classification": True,
     "instances": [{"input": "富士山は日本で一番高い山です。", "output": "事実"}]},
]
HELDOUT = ["h_bakery", "h_spam", "h_ja_mail", "h_ja_fact"]
HELDOUT_TEXTS = [s["instruction"] for s in SEEDS if s["id"] in HELDOUT]
HELDOUT_OUTPUTS = [i["output"] for s in SEEDS if s["id"] in HELDOUT for i in s["instances"]]
# Planted near-copies of held-out tasks, one a language, and an exact copy in full-width letters' spirit.
NEAR_COPY_EN = "Suggest five names for a small bakery that sells sourdough bread and cakes."
NEAR_COPY_JA = "取引先へ納品の遅れをお詫びするメールを丁寧に書いてください。"
FRESH = ["Describe how a lighthouse keeper spends a winter night.", "Explain how tides are caused by the moon.",
         "Compare trains and planes for a 500 km trip.", "List four ways to save water at home.",
         "日本の四季の特徴を三つ説明してください。", "おすすめの朝ごはんを理由とともに紹介してください。"]


@pytest.fixture
def seeds_file(tmp_path) -> Path:
    path = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    heldout_path_for(path).write_text("# unseen tasks\n" + "\n".join(f"{i}  # held out" for i in HELDOUT) + "\n\n",
                                      encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


# ------------------------------------------------------------------------ the list itself


def test_the_shipped_list_is_the_seeded_stratified_tenth():
    tasks = load_seeds(ROOT / DEFAULT_SEEDS)
    listed = read_heldout_ids(heldout_path_for(ROOT / DEFAULT_SEEDS), {t.id for t in tasks})
    # Regenerate with `python -m pipeline.seeds` after changing the seed file.
    assert listed == choose_heldout(tasks)
    strata = Counter((t.language, t.is_classification) for t in tasks)
    chosen = Counter((t.language, t.is_classification) for t in tasks if t.id in set(listed))
    assert set(chosen) == set(strata)  # every language x kind has unseen tasks, Japanese classification too
    for stratum, size in strata.items():
        assert chosen[stratum] == heldout_count(size, HELDOUT_FRACTION), stratum


def test_choose_heldout_is_seeded_and_stratified():
    tasks = [SeedTask(f"s{i}", f"task {i}", (Instance("", "x"),), is_classification=i % 4 == 0, language="ja" if i % 3 else "en")
             for i in range(120)]
    first = choose_heldout(tasks, 0.1, seed=1)
    assert first == choose_heldout(tasks, 0.1, seed=1) and first != choose_heldout(tasks, 0.1, seed=2)
    by_id = {t.id: t for t in tasks}
    sizes = Counter((t.language, t.is_classification) for t in tasks)
    picked = Counter((by_id[i].language, by_id[i].is_classification) for i in first)
    assert picked == {stratum: heldout_count(n, 0.1) for stratum, n in sizes.items()}


def test_the_list_is_checked_and_a_seed_file_without_one_holds_nothing_out(tmp_path, seeds_file):
    split = load_seed_split(seeds_file)
    assert [t.id for t in split.heldout] == HELDOUT and len(split.train) == len(SEEDS) - len(HELDOUT)
    heldout_path_for(seeds_file).write_text("h_spam\n\nno_such_task\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"seeds\.heldout\.txt:3: id: 'no_such_task' is not a task"):
        load_seed_split(seeds_file)
    other = write_jsonl(tmp_path / "other.jsonl", SEEDS)
    assert load_seed_split(other).heldout == []


# ------------------------------------------------------------------------ decontamination


def test_filter_drops_a_planted_near_copy_of_a_heldout_task_as_eval_overlap(tmp_path, seeds_file, capsys):
    near_train = "Write a short poem about the autumn wind at night."  # close to a training seed instead
    candidates = [{"id": f"m{i}", "instruction": text} for i, text in
                  enumerate([NEAR_COPY_EN, NEAR_COPY_JA, HELDOUT_TEXTS[3], near_train] + FRESH)]
    write_jsonl(tmp_path / "in.jsonl", candidates)
    out = tmp_path / "out.jsonl"
    assert main(["filter", "--in", str(tmp_path / "in.jsonl"), "--seeds", str(seeds_file), "--out", str(out)]) == 0
    rejected = {r["instruction"]: r for r in read(tmp_path / "out.rejected.jsonl")}
    for text, task in ((NEAR_COPY_EN, "h_bakery"), (NEAR_COPY_JA, "h_ja_mail"), (HELDOUT_TEXTS[3], "h_ja_fact")):
        assert rejected[text]["reason"] == EVAL_OVERLAP, text
        assert rejected[text]["filter_most_similar"]["id"] == task and rejected[text]["filter_max_rouge_l"] > 0.7
    assert rejected[near_train]["reason"] == "near_duplicate"  # a training seed's neighbour is an ordinary duplicate
    assert [r["instruction"] for r in read(out)] == FRESH
    report = json.loads((tmp_path / "out.report.json").read_text(encoding="utf-8"))
    assert report["rejected_by_reason"][EVAL_OVERLAP] == 3 and report["heldout_seeds"] == 4
    printed = capsys.readouterr().out
    assert f"rejected: {EVAL_OVERLAP}" in printed and "4 held out" in printed


def test_generate_drops_a_near_copy_and_never_shows_a_heldout_seed(tmp_path, seeds_file):
    # Each language has two training seeds, so every prompt shows two examples and the list goes on at 3.
    answers = iter(["3. " + NEAR_COPY_EN + "\n4. " + NEAR_COPY_JA + "\n5. " + FRESH[0] + "\n6. " + FRESH[1]])

    def answer(request):
        return next(answers, "3. " + FRESH[2] + "\n4. " + FRESH[3] + "\n5. " + FRESH[4] + "\n6. " + FRESH[5])

    client = FakeClient(answer)
    cfg = generate.Config(seeds=str(seeds_file), out=str(tmp_path / "machine.jsonl"), num_instructions=4, cache=False,
                          cache_dir=str(tmp_path / "cache"))
    stats = generate.run(cfg, client=client)
    rejected = {r["instruction"]: r for r in read(tmp_path / "machine.rejected.jsonl")}
    assert rejected[NEAR_COPY_EN]["reason"] == EVAL_OVERLAP and rejected[NEAR_COPY_EN]["most_similar"] == "h_bakery"
    assert rejected[NEAR_COPY_JA]["reason"] == EVAL_OVERLAP and rejected[NEAR_COPY_JA]["most_similar"] == "h_ja_mail"
    assert stats.rejected[EVAL_OVERLAP] == 2
    prompts = [json.dumps([r.prompt, r.messages], ensure_ascii=False) for r in client.seen]
    assert prompts and not any(text in p for p in prompts for text in HELDOUT_TEXTS + HELDOUT_OUTPUTS)
    records = read(tmp_path / "machine.jsonl") + list(rejected.values())
    assert not {i for r in records for i in r.get("prompt_seed_ids", [])} & set(HELDOUT)


def test_respond_never_shows_a_heldout_seed_as_a_few_shot_example(tmp_path, seeds_file):
    tasks = write_jsonl(tmp_path / "filtered.jsonl", [{"id": f"m{i}", "instruction": text} for i, text in enumerate(FRESH)])
    client = FakeClient(lambda r: "No" if "classification" in json.dumps(r.messages) or "分類" in json.dumps(
        r.messages, ensure_ascii=False) else "Input: a\nOutput: b")
    cfg = respond.Config(in_path=str(tasks), seeds=str(seeds_file), out=str(tmp_path / "alpaca.jsonl"), cache=False,
                         cache_dir=str(tmp_path / "cache"), instances_per_instruction=2)
    respond.run(cfg, client=client)
    sent = [json.dumps([r.prompt, r.messages], ensure_ascii=False) for r in client.seen]
    assert len(sent) >= 2 * len(FRESH)
    training_examples = [s["instruction"] for s in SEEDS if s["id"] not in HELDOUT]
    assert any(text in p for p in sent for text in training_examples)  # few-shot examples were shown...
    assert not any(text in p for p in sent for text in HELDOUT_TEXTS + HELDOUT_OUTPUTS)  # ...never held-out ones


def test_mix_leaves_heldout_seeds_out_unless_asked(tmp_path, seeds_file):
    generated = write_jsonl(tmp_path / "gen.jsonl", [{"id": "g1", "instruction": FRESH[0], "input": "", "output": "ok"}])
    out = tmp_path / "train.jsonl"
    mix.run(mix.Config(in_paths=(str(generated), str(seeds_file)), out=str(out)))
    task_ids = {r.get("task_id") for r in read(out)}
    assert task_ids == {None, "t_poem", "t_sent", "t_ja_tr", "t_ja_cls"}
    mix.run(mix.Config(in_paths=(str(generated), str(seeds_file)), out=str(out), include_heldout=True))
    assert {r.get("task_id") for r in read(out)} >= set(HELDOUT)


# ------------------------------------------------------------------------ eval on unseen tasks


def test_eval_data_heldout_scores_only_the_heldout_tasks(tmp_path, seeds_file, capsys):
    records = ev.load_eval_records(ev.Config(data="heldout", seeds=str(seeds_file)))
    assert [r["id"] for r in records] == ["h_bakery#0", "h_spam#0", "h_spam#1", "h_ja_mail#0", "h_ja_fact#0"]
    bare = write_jsonl(tmp_path / "bare.jsonl", SEEDS)
    assert main(["eval", "--data", "heldout", "--seeds", str(bare), "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "--data heldout:" in err and "bare.heldout.txt" in err and "Traceback" not in err


def test_eval_on_heldout_tasks_reports_unseen_tasks_per_kind_language_and_source(tmp_path, seeds_file, tiny_model_dir):
    out = tmp_path / "eval.json"
    ev.run(ev.Config(model=str(tiny_model_dir), baseline=str(tiny_model_dir), data="heldout", seeds=str(seeds_file),
                     out=str(out), max_new_tokens=3, device="cpu"))
    result = json.loads(out.read_text(encoding="utf-8"))
    breakdown = result["breakdown"]
    assert {k: v["records"] for k, v in breakdown["kind"].items()} == {"classification": 3, "generation": 2}
    assert {k: v["records"] for k, v in breakdown["language"].items()} == {"en": 3, "ja": 2}
    assert set(breakdown["source"]) == {"seed"}
    # Classification is judged by its label only; generation by the text measures and teacher forcing.
    assert set(breakdown["kind"]["classification"]["tuned"]) == {"label_accuracy"}
    assert {"token_accuracy", "sequence_accuracy", "exact_match", "rouge_l", "bleu"} <= set(breakdown["kind"]["generation"]["baseline"])
    assert "label_accuracy" in result["metrics"]
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert table.startswith("# Eval on unseen tasks: 4 held-out seed tasks")
    assert "## By kind" in table and "| classification | 3 | label_accuracy |" in table and "## By language" in table


def test_sequence_accuracy_compares_the_token_ids_training_teaches(tiny_model_dir):
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    eos = [tokenizer.eos_token_id]
    record = {"instruction": "日本語で挨拶してください。", "input": "", "output": "こんにちは。"}
    for template in ("alpaca", "chat"):
        ids = ev.reference_answer_ids(record, "こんにちは。", tokenizer, template, eos)
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "こんにちは。", template
        # Another reference of the same prompt is encoded as that record's answer would be.
        other = ev.reference_answer_ids(record, "こんにちは 。", tokenizer, template, eos)
        assert other != ids, template


def test_make_demo_evaluates_base_and_tuned_on_every_unseen_task():
    import re
    import subprocess

    plan = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    command = " ".join(line.rstrip("\\ ") for line in plan.splitlines() if "pipeline eval" in line or "--limit" in line)
    assert "--data heldout" in command and "--baseline" in command
    limit = int(re.search(r"--limit (\d+)", command).group(1))
    # --limit keeps the first records, English ones first: it must hold every held-out instance.
    assert limit >= len(ev.load_eval_records(ev.Config(data="heldout", seeds=str(ROOT / DEFAULT_SEEDS))))
