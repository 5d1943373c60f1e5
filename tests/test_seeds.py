"""pipeline/seeds.py and the shipped seed file: the seeds load, are diverse enough, and bad lines name file, line and field."""

import datetime
import itertools
import json
import re
from pathlib import Path

import pytest

from pipeline.errors import InputError, UserError
from pipeline.seeds import DEFAULT_SEEDS, Instance, load_seeds
from pipeline.similarity import rouge_l, tokenize
from tests.conftest import write_jsonl

SEED_FILE = Path(__file__).resolve().parent.parent / DEFAULT_SEEDS

# The issue asks for 180+ tasks, 45+ Japanese and 27%+ classification; the tests keep a
# small margin so that pruning a couple of weak seeds later does not break the suite.
MIN_SEED_TASKS = 175
MIN_JAPANESE_TASKS = 60
MIN_CLASSIFICATION_SHARE = 0.25
# The filter drops a candidate above 0.7 against the pool, which the seeds start; seeds this
# close to each other would make every paraphrase of either look like a duplicate.
MAX_SEED_PAIR_ROUGE_L = 0.65


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



# ---------------------------------------------------------------- Japanese seeds: content checks


@pytest.fixture(scope="module")
def japanese(seeds):
    return [task for task in seeds if task.language == "ja"]


def test_no_two_seed_instructions_are_near_duplicates(seeds):
    tokens = [tokenize(task.instruction, "multilingual") for task in seeds]
    worst = max((rouge_l(tokens[i], tokens[j]), seeds[i].id, seeds[j].id)
                for i, j in itertools.combinations(range(len(seeds)), 2))
    assert worst[0] <= MAX_SEED_PAIR_ROUGE_L, worst


def test_the_users_own_example_is_a_seed_and_every_length_limit_holds(japanese):
    # 「以下の文章を50文字以内で要約してください。」 is the task this project was asked for.
    assert "以下の文章を50文字以内で要約してください。" in [task.instruction for task in japanese]
    limited = [task for task in japanese if re.search(r"\d+文字以内", task.instruction)]
    for task in limited:
        limit = int(re.search(r"(\d+)文字以内", task.instruction).group(1))
        for instance in task.instances:  # punctuation counts, as in any Japanese 字数制限
            assert len(instance.output) <= limit, (task.id, len(instance.output))


# Runs of quoted labels: 「X」「Y」, 「X」か「Y」, 「X」または「Y」, 「X」、「Y」.
_QUOTED = re.compile(r"「([^「」]+)」")
_LABEL_GAPS = {"", "か", "または", "、", "と"}


def _label_list(instruction: str) -> list[str]:
    """The last run of two or more quoted words: the label set a Japanese classifier names."""
    runs, run, end = [], [], None
    for match in _QUOTED.finditer(instruction):
        if end is not None and instruction[end:match.start()] not in _LABEL_GAPS:
            runs.append(run)
            run = []
        run.append(match.group(1))
        end = match.end()
    runs.append(run)
    listed = [run for run in runs if len(run) >= 2]
    return listed[-1] if listed else []


def test_label_list_is_read_from_the_instruction():
    assert _label_list("文中の「れる・られる」の意味は「受け身」「可能」「尊敬」「自発」のどれ？") == ["受け身", "可能", "尊敬", "自発"]
    assert _label_list("「肯定」または「否定」で答えてください。") == ["肯定", "否定"]
    assert _label_list("次の文を要約してください。") == []


def test_japanese_classifiers_use_every_label_they_name_and_no_other(japanese):
    checked = 0
    for task in japanese:
        labels = _label_list(task.instruction) if task.is_classification else []
        if labels:
            checked += 1
            assert {instance.output for instance in task.instances} == set(labels), task.id
    assert checked >= 10  # the rule reads most Japanese classifiers, so this test cannot pass empty


def test_no_japanese_label_is_the_start_of_another(japanese):
    # A negation is a suffix in Japanese (皮肉 / 皮肉ではない): an answer cut short reads as the other label.
    for task in japanese:
        if task.is_classification:
            labels = {instance.output for instance in task.instances}
            assert not [(a, b) for a in labels for b in labels if a != b and b.startswith(a)], task.id


def test_japanese_requests_vary_in_frame_and_register(japanese):
    same_frame = [task.id for task in japanese if task.is_classification
                  and re.search(r"」(か|または)「[^」]+」(で|と)答えてください", task.instruction)]
    classifiers = [task for task in japanese if task.is_classification]
    assert len(same_frame) <= len(classifiers) // 3, same_frame
    casual = [task.id for task in japanese if not re.search(r"(ください|なさい|ますか)[。？]?$", task.instruction)]
    assert len(casual) >= 5, casual


# One kigo or two per season, enough for the haiku seeds; 夕焼け is summer.
KIGO = {"春": ("桜", "花いかだ", "春"), "夏": ("夕焼け", "蝉", "風鈴"), "秋": ("秋の暮れ", "柿", "すすき", "紅葉"),
        "冬": ("木枯らし", "雪", "こたつ")}


def _seasons_in(haiku: str) -> set[str]:
    return {season for season, words in KIGO.items() if any(word in haiku for word in words)}


def test_haiku_seeds_carry_the_kigo_of_their_season(japanese):
    haiku = [task for task in japanese if "俳句" in task.instruction]
    assert len(haiku) >= 2
    for task in haiku:
        for instance in task.instances:
            if task.is_classification:  # the season label must be the haiku's kigo's season
                assert _seasons_in(instance.input) == {instance.output}, (task.id, instance.input)
            elif task.instruction.startswith("秋"):
                assert _seasons_in(instance.output) == {"秋"}, (task.id, instance.output)


def test_no_japanese_output_stacks_three_no_in_one_phrase(japanese):
    # 「この事業の計画の枠組み」: three の in a few characters reads as a translation.
    stacked = re.compile(r"の[^、。のを\n]{1,4}の[^、。のを\n]{1,4}の")
    for task in japanese:
        for instance in task.instances:
            assert not stacked.search(instance.output), (task.id, stacked.search(instance.output).group(0))


def test_letters_are_signed_by_their_sender_and_promise_a_date(japanese):
    letters = [(task, instance) for task in japanese for instance in task.instances if "差出人：" in instance.input]
    assert len(letters) >= 3
    for task, instance in letters:
        sender = re.search(r"差出人：([^／\n]+)", instance.input).group(1).split()
        assert instance.output.rstrip().endswith(sender[-1]), task.id  # the name signs the letter
        assert all(part in instance.output for part in sender), task.id  # company and department too
        assert "見込み" not in instance.output, task.id


# 元年 of each era in the Western calendar, minus one: 平成 n = 1988 + n.
ERA_OFFSET = {"昭和": 1925, "平成": 1988, "令和": 2018}


def test_era_year_conversions_are_right(japanese):
    (task,) = [task for task in japanese if "和暦" in task.instruction and "西暦" in task.instruction]
    for instance in task.instances:
        era = re.fullmatch(r"(昭和|平成|令和)(\d+)年", instance.input)
        western = re.fullmatch(r"(\d{4})年", instance.input)
        if era:
            assert instance.output.startswith(f"{ERA_OFFSET[era[1]] + int(era[2])}年"), instance
        else:
            year = int(western[1])
            began = [(name, year - offset) for name, offset in ERA_OFFSET.items() if year - offset >= 1]
            name, number = began[-1]  # the latest era that had begun; its first year is 元年
            assert f"{name}{'元' if number == 1 else number}年" in instance.output, instance
            if number == 1:  # an era's first year is also the last of the one before
                previous, last = began[-2]
                assert f"{previous}{last}年" in instance.output, instance
    assert len(task.instances) >= 3


def test_dates_with_a_year_name_the_right_weekday(seeds):
    checked = 0
    for task in seeds:
        for instance in task.instances:
            text = instance.input + "\n" + instance.output
            year = re.search(r"(\d{4})年", text)
            if not year:
                continue
            for month, day, weekday in re.findall(r"(\d{1,2})月(\d{1,2})日（([月火水木金土日])）", text):
                date = datetime.date(int(year[1]), int(month), int(day))
                assert "月火水木金土日"[date.weekday()] == weekday, (task.id, date)
                checked += 1
    assert checked >= 3
