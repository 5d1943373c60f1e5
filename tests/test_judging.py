"""pipeline/judging.py: rubric prompts, tolerant parsing, probability scores and pairwise verdicts, on literal strings."""

import json
import math

import pytest

from pipeline import judging
from pipeline.backends import Request, Response
from pipeline.errors import UserError
from tests.fakes import FakeClient


@pytest.mark.parametrize("reply, score, shape", [
    ('{"reason": "Correct and concise.", "score": 4}', 4, "json"),
    ('Here is my verdict:\n```json\n{"reason": "Wrong sum.", "score": 1}\n```', 1, "json"),
    ('The answer is fine. {"score": "5", "reason": "ok"} Thanks.', 5, "json"),
    ("The answer misses the second half. Rating: [[2]]", 2, "brackets"),
    ("Score: 4\nThe answer is right but wordy.", 4, "labelled"),
    ("**Score:** 3", 3, "labelled"),
    ("Score (1-5): 4", 4, "labelled"),
    ("評価（1〜5）：2", 2, "labelled"),
    ("I would give it 4/5 because it is mostly right.", 4, "fraction"),
    ("4 out of 5", 4, "fraction"),
    ("評価：4\n理由：正しいが、少し冗長です。", 4, "labelled"),
    ("評価：４（全角）", 4, "labelled"),
    ("この回答は5点満点中2点です。計算が間違っています。", 2, "ja_points"),
    ("3点。指示の半分にしか答えていません。", 3, "ja_points"),
    ("5", 5, "bare"),
    ("**2**", 2, "bare"),
])
def test_parse_score_reads_every_shape(reply, score, shape):
    parsed = judging.parse_score(reply)
    assert parsed is not None and parsed[0] == score and parsed[2] == shape


@pytest.mark.parametrize("reply", [
    "I cannot judge this.", "", "Score: 7", '{"score": 0, "reason": "x"}', '{"score": true}', "Score: 45",
    "1.5 km is the distance", "この回答は良いと思います。", "5点満点で評価します。", "Score it from 1 to 5.",
])
def test_parse_score_refuses_what_is_not_a_score(reply):
    assert judging.parse_score(reply) is None


def test_parse_score_keeps_the_reason_in_the_records_language():
    assert judging.parse_score('{"reason": "計算が正しく、簡潔です。", "score": 5}')[1] == "計算が正しく、簡潔です。"
    assert judging.parse_score("Score: 2 - the capital is wrong")[1] == "the capital is wrong"


@pytest.mark.parametrize("reply, winner", [
    ('{"reason": "B is right.", "winner": "B"}', "B"), ('{"winner": "tie", "reason": ""}', "tie"),
    ("[[A]]", "A"), ("After comparing: [[C]]", "tie"), ("A", "A"), ("**B**", "B"),
    ("Winner: B", "B"), ("Answer A is better because it is correct.", "A"),
    ("回答Bの方が良いです。", "B"), ("勝者：A", "A"),
])
def test_parse_winner(reply, winner):
    assert judging.parse_winner(reply)[0] == winner


def test_parse_winner_refuses_prose_without_a_verdict():
    assert judging.parse_winner("Both answers discuss apples.") is None


def test_expected_score_is_the_expectation_over_the_digits():
    logprobs = {"4": math.log(0.6), " 4": math.log(0.1), "5": math.log(0.2), "The": math.log(0.05), "3": math.log(0.05)}
    score, distribution, mass = judging.expected_score(logprobs)
    # P(3..5) renormalised over the digits: 0.05, 0.7, 0.2 out of 0.95.
    assert score == pytest.approx((3 * 0.05 + 4 * 0.7 + 5 * 0.2) / 0.95)
    assert mass == pytest.approx(0.95)
    assert distribution["4"] == pytest.approx(0.7 / 0.95, abs=1e-4) and distribution["1"] == 0


def test_expected_score_with_no_digit_mass_is_none():
    assert judging.expected_score({"The": math.log(0.9)}) is None
    assert judging.expected_score({}) is None


def test_full_width_digit_tokens_count():
    score, _, _ = judging.expected_score({"５": 0.0})
    assert score == 5


@pytest.mark.parametrize("first, second, winner, flipped", [
    ("A", "B", "a", False),   # a first, then a second: a wins both times
    ("B", "A", "b", False),
    ("A", "A", "tie", True),  # the answer shown first wins whichever it is: position bias
    ("B", "B", "tie", True),
    ("tie", "tie", "tie", False),
    ("A", "tie", "tie", False),
    (None, "A", None, False),
])
def test_combine_both_orders(first, second, winner, flipped):
    got, got_flipped, _ = judging.combine(first, second)
    assert (got, got_flipped) == (winner, flipped)


def item(**kw):
    values = dict(key="k", instruction="Add the numbers.", answer="5", input="2 and 3")
    values.update(kw)
    return judging.JudgeItem(**values)


def test_rubric_follows_the_instructions_language():
    settings = judging.JudgeSettings()
    en = judging.pointwise_prompt(item(), settings, judging.load_rubric("pointwise", "en"))
    ja_item = item(instruction="次の二つの数を足してください。", input="2と3")
    ja = judging.pointwise_prompt(ja_item, settings, judging.load_rubric("pointwise", ja_item.lang))
    assert ja_item.lang == "ja" and "審査員" in ja and "【指示】" in ja and "2と3" in ja and "日本語" in ja
    assert "[Instruction]" in en and "2 and 3" in en and "審査員" not in en


def test_reference_answer_is_shown_only_when_there_is_one():
    rubric = judging.load_rubric("pointwise", "en")
    settings = judging.JudgeSettings()
    assert "Reference answer" not in judging.pointwise_prompt(item(), settings, rubric)
    assert "[Reference answer" in judging.pointwise_prompt(item(reference="5"), settings, rubric)
    ja_rubric = judging.load_rubric("pointwise", "ja")
    assert "【参考解答" in judging.pointwise_prompt(item(instruction="足し算をしてください。", reference="5"), settings, ja_rubric)


def test_probability_prompt_asks_for_the_bare_digit():
    request = judging.pointwise_request(item(), judging.JudgeSettings(scoring="probs"), judging.load_rubric("pointwise", "en"))
    assert request.top_logprobs == judging.TOP_LOGPROBS and request.logprob_tokens == judging.DIGITS
    assert "one digit from 1 to 5" in request.messages[0]["content"] and request.response_format is None


def test_text_request_carries_the_json_schema():
    request = judging.pointwise_request(item(), judging.JudgeSettings(), judging.load_rubric("pointwise", "en"))
    schema = json.loads(request.response_format)
    assert schema["type"] == "json_schema"
    assert schema["json_schema"]["schema"]["properties"]["score"]["enum"] == [1, 2, 3, 4, 5]
    unstructured = judging.pointwise_request(item(), judging.JudgeSettings(structured=False), judging.load_rubric("pointwise", "en"))
    assert unstructured.response_format is None


def test_user_rubric_without_a_slot_is_one_clear_error(tmp_path):
    bad = tmp_path / "rubric.txt"
    bad.write_text("Rate the answer: {answer}", encoding="utf-8")
    with pytest.raises(UserError, match=r"--rubric .*rubric.txt: has no \{question\} slot"):
        judging.load_rubric("pointwise", "en", bad)
    with pytest.raises(UserError, match="no such file"):
        judging.load_rubric("pointwise", "en", tmp_path / "missing.txt")


def test_user_rubric_gets_the_reply_format_appended_and_keeps_its_braces(tmp_path):
    path = tmp_path / "rubric.txt"
    path.write_text('Like {"this"}. Task: {question}\nAnswer: {answer}', encoding="utf-8")
    rubric = judging.load_rubric("pointwise", "en", path)
    text = judging.pointwise_prompt(item(), judging.JudgeSettings(), rubric)
    assert text.startswith('Like {"this"}. Task: [Instruction]') and text.rstrip().endswith("an integer from 1 to 5>}")
    assert rubric.name == "rubric.txt" and len(rubric.sha256) == judging.HASH_CHARS


def scripted(replies: dict[str, list[str]]):
    """A fake client answering each key's requests with its scripted replies, in order."""
    def answer(request: Request):
        return replies[request.key].pop(0)
    return FakeClient(answer)


def test_unreadable_reply_is_asked_again_once_then_given_up():
    client = scripted({"good": ["Score: 4"], "late": ["hmm", '{"reason": "ok", "score": 3}'],
                       "never": ["I refuse.", "Still no."]})
    items = [item(key=k) for k in ("good", "late", "never")]
    results = {i.key: j for i, j in judging.judge_items(client, items, judging.JudgeSettings())}
    assert results["good"].score == 4 and not results["good"].reasked
    assert results["late"].score == 3 and results["late"].reasked and len(results["late"].responses) == 2
    assert results["never"].unparsed and results["never"].reasked
    reask = [r for r in client.seen if r.key == "never"][1]
    assert "could not be read" in reask.messages[0]["content"] and "I refuse." in reask.messages[0]["content"]


def test_japanese_reask_note_is_japanese():
    client = scripted({"ja": ["うーん", "評価：2"]})
    (_, judgement), = judging.judge_items(client, [item(key="ja", instruction="要約してください。")], judging.JudgeSettings())
    assert judgement.score == 2 and "読み取れませんでした" in client.seen[1].messages[0]["content"]


def test_probability_reply_without_logprobs_falls_back_to_its_text():
    client = FakeClient(lambda r: "4")
    (_, judgement), = judging.judge_items(client, [item()], judging.JudgeSettings(scoring="probs"))
    assert judgement.score == 4 and judgement.scoring == "text"


def test_probability_reply_is_an_expectation():
    def answer(request):
        return Response(request=request, texts=["4"], top_logprobs=[{"4": math.log(0.5), "5": math.log(0.5)}])
    (_, judgement), = judging.judge_items(FakeClient(answer), [item()], judging.JudgeSettings(scoring="probs"))
    assert judgement.score == pytest.approx(4.5) and judgement.scoring == "probs"
    assert judgement.distribution == {"1": 0, "2": 0, "3": 0, "4": 0.5, "5": 0.5}


def test_failed_request_is_an_error_not_an_unparsed_reply():
    client = FakeClient(lambda r: Response(request=r, error="HTTP 500: boom"))
    (_, judgement), = judging.judge_items(client, [item()], judging.JudgeSettings())
    assert judgement.error and not judgement.unparsed and len(client.seen) == 1


def pair(key="p", **kw):
    values = dict(key=key, instruction="What is 2 + 3?", answer_a="5", answer_b="6")
    values.update(kw)
    return judging.Pair(**values)


def test_always_a_judge_gives_ties_never_a_wrong_winner():
    client = FakeClient(lambda r: '{"reason": "A is better.", "winner": "A"}')
    verdicts = [v for _, v in judging.pairwise_verdicts(client, [pair(f"p{i}") for i in range(5)], judging.JudgeSettings())]
    assert len(client.seen) == 10 and all(v.winner == "tie" and v.flipped for v in verdicts)
    assert judging.flip_share(verdicts) == 1.0


def test_consistent_judge_picks_the_right_answer_in_both_orders():
    def answer(request):
        text = request.messages[0]["content"]
        # The right answer "5" is A when it is shown first.
        return "[[A]]" if "[Answer A]\n5\n" in text else "[[B]]"
    (_, verdict), = judging.pairwise_verdicts(FakeClient(answer), [pair()], judging.JudgeSettings())
    assert verdict.winner == "a" and not verdict.flipped and verdict.orders == ("a", "a")


def test_pairwise_prompt_shows_both_orders_and_japanese_rubric():
    client = FakeClient(lambda r: "A")
    list(judging.pairwise_verdicts(client, [pair(instruction="2と3を足すといくつですか？", answer_a="5です。", answer_b="6です。")],
                                   judging.JudgeSettings()))
    first, second = (r.messages[0]["content"] for r in client.seen)
    assert "【回答A】\n5です。" in first and "【回答A】\n6です。" in second and "審査員" in first


def test_pairwise_probabilities_pick_by_letter_probability():
    def answer(request):
        text = request.messages[0]["content"]
        right_first = "[Answer A]\n5\n" in text
        p_a = 0.8 if right_first else 0.3
        return Response(request=request, texts=["A"], top_logprobs=[{"A": math.log(p_a), "B": math.log(1 - p_a)}])
    (_, verdict), = judging.pairwise_verdicts(FakeClient(answer), [pair()], judging.JudgeSettings(scoring="probs"))
    assert verdict.winner == "a" and verdict.p_a == (pytest.approx(0.8), pytest.approx(0.7))


def test_scoring_auto_is_probabilities_on_the_local_backend_and_text_from_a_server():
    assert judging.resolve_scoring("auto", "local") == "probs"
    assert judging.resolve_scoring("auto", "openai") == "text"
    assert judging.resolve_scoring("text", "local") == "text" and judging.resolve_scoring("probs", "openai") == "probs"
