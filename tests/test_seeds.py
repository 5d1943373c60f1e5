"""pipeline/seeds.py and the shipped seed file: the seeds load, are diverse enough, and bad lines name file, line and field."""

import json
from pathlib import Path

import pytest

from pipeline.errors import InputError, UserError
from pipeline.seeds import DEFAULT_SEEDS, Instance, load_seeds
from tests.conftest import write_jsonl

SEED_FILE = Path(__file__).resolve().parent.parent / DEFAULT_SEEDS

# The issue asks for 180+ tasks, 45+ Japanese and 27%+ classification; the tests keep a
# small margin so that pruning a couple of weak seeds later does not break the suite.
MIN_SEED_TASKS = 175
MIN_JAPANESE_TASKS = 40
MIN_CLASSIFICATION_SHARE = 0.25


@pytest.fixture(scope="module")
def seeds():
    return load_seeds(SEED_FILE)


def test_seed_file_is_utf8_jsonl_with_readable_japanese():
    text = SEED_FILE.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert all(json.loads(line) for line in lines)
    assert "\\u" not in text, "Japanese must be written as is (ensure_ascii=False), not as escapes"


def test_seed_file_counts(seeds):
    assert len(seeds) >= MIN_SEED_TASKS
    assert sum(task.language == "ja" for task in seeds) >= MIN_JAPANESE_TASKS
    classification = [task for task in seeds if task.is_classification]
    assert len(classification) / len(seeds) >= MIN_CLASSIFICATION_SHARE
    # Both languages need classification examples, or generation never sees a Japanese one.
    assert {task.language for task in classification} == {"en", "ja"}


def test_seed_ids_are_unique_and_sequential(seeds):
    assert [task.id for task in seeds] == [f"seed_task_{i}" for i in range(len(seeds))]


def test_seed_instructions_and_names_are_unique(seeds):
    instructions = [task.instruction for task in seeds]
    assert len(set(instructions)) == len(instructions)
    names = [task.name for task in seeds]
    assert all(names) and len(set(names)) == len(names)


def test_every_seed_has_a_non_empty_output(seeds):
    for task in seeds:
        assert task.instances, task.id
        assert all(instance.output.strip() for instance in task.instances), task.id


def test_seed_instructions_start_with_a_letter(seeds):
    for task in seeds:
        first = task.instruction[0]
        assert first.isalnum(), f"{task.id} starts with {first!r}"


def test_classification_seeds_show_more_than_one_label(seeds):
    for task in seeds:
        if task.is_classification:
            labels = {instance.output for instance in task.instances}
            assert len(labels) >= 2, task.id


def test_self_instruct_record_loads_every_field(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "t0", "name": "sentiment", "instruction": " Label the review. ", "is_classification": True,
         "instances": [{"input": "Great!", "output": "positive"}, {"output": "negative"}]},
        {"id": 7, "instruction": "次の文を英語に訳してください。", "instances": [{"input": "猫", "output": "cat"}]},
    ])
    first, second = load_seeds(path)
    assert first.id == "t0" and first.name == "sentiment" and first.is_classification
    assert first.instruction == "Label the review."
    assert first.instances == (Instance("Great!", "positive"), Instance("", "negative"))
    assert first.language == "en"
    assert second.id == "7" and not second.is_classification and second.language == "ja"


def test_alpaca_lines_sharing_an_instruction_become_one_task(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a color.", "input": "", "output": "blue"},
        {"instruction": "Translate to French.", "input": "dog", "output": "chien"},
    ])
    tasks = load_seeds(path)
    assert [task.instruction for task in tasks] == ["Translate to French.", "Name a color."]
    assert tasks[0].instances == (Instance("cat", "chat"), Instance("dog", "chien"))
    assert tasks[1].instances == (Instance("", "blue"),)
    assert len({task.id for task in tasks}) == 2


@pytest.mark.parametrize("bad_record, field", [
    ({"id": "b", "instruction": "Do it.", "instances": [{"input": "x"}]}, "instances[0].output"),
    ({"id": "b", "instruction": "Do it.", "instances": [{"output": "ok"}, {"output": 3}]}, "instances[1].output"),
    ({"id": "b", "instruction": "Do it.", "instances": []}, "instances"),
    ({"id": "b", "instruction": "Do it.", "instances": "x"}, "instances"),
    ({"id": "b", "instruction": "", "instances": [{"output": "ok"}]}, "instruction"),
    ({"id": "b", "instruction": "Do it.", "instances": [{"output": "ok"}], "is_classification": "yes"}, "is_classification"),
    ({"instruction": "Do it.", "input": "x"}, "output"),
    ({"id": "seed_task_0", "instruction": "Again.", "instances": [{"output": "ok"}]}, "id"),
])
def test_bad_line_names_file_line_and_field(tmp_path, bad_record, field):
    good = {"id": "seed_task_0", "instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}
    path = write_jsonl(tmp_path / "file.jsonl", [good, bad_record])
    with pytest.raises(InputError) as e:
        load_seeds(path)
    assert f"file.jsonl:2: {field}:" in str(e.value)
    assert e.value.line == 2 and e.value.field == field


def test_duplicate_id_says_where_it_first_appeared(tmp_path):
    records = [{"id": task_id, "instruction": f"Task {i}.", "instances": [{"output": "ok"}]}
               for i, task_id in enumerate(["a", "b", "a"])]
    with pytest.raises(InputError, match=r"file\.jsonl:3: id: duplicate id 'a' \(first on line 1\)"):
        load_seeds(write_jsonl(tmp_path / "file.jsonl", records))


def test_instance_that_is_not_an_object_is_named(tmp_path):
    path = write_jsonl(tmp_path / "file.jsonl", [{"instruction": "Do it.", "instances": ["just text"]}])
    with pytest.raises(InputError, match=r"file\.jsonl:1: instances\[0\]: expected a JSON object"):
        load_seeds(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="no seed tasks"):
        load_seeds(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_seeds(tmp_path / "absent.jsonl")

