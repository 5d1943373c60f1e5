"""An LLM as a judge: rubric prompts, tolerant score parsing, probability scores, pairwise verdicts.

Pure functions and two streaming helpers, shared by every stage that asks a model for a
judgement (`judge` scores records, `prefs` and `eval` compare answers); this module is below
them all and imports no stage.

- Rubrics are prompt files, `pipeline/prompt_files/judge_{pointwise,pairwise}_{en,ja}.txt`,
  chosen by the language of the record's instruction; a user's file replaces them
  (`load_rubric(..., path=...)`). Slots in braces: `{question}` (the instruction, its input
  and, when the record carries one, the reference answer), `{answer}` (pointwise) or
  `{answer_a}` / `{answer_b}` (pairwise), and `{format}` (how to reply; appended when a
  rubric leaves it out). Other braces are left alone, so a rubric may show JSON.
- Two ways to read a score:
  * `text`: ask for `{"reason", "score"}` as JSON, with `response_format` `json_schema` on
    servers that honour it; `parse_score` also reads the plain answers of servers that do
    not (JSON inside text, `Rating: [[4]]`, `Score: 4`, `4/5`, 「評価：4」). An answer that
    does not parse is asked again once, with a note saying so.
  * `probs` (G-Eval, Liu et al. 2023): ask for the bare digit and take the expectation over
    the probabilities of the five digit tokens of the first answer token. It cannot fail to
    parse, it is finer than five steps, and on the local backend it is one forward pass.
- `pairwise_verdicts` asks for A-vs-B in both orders. A verdict that agrees in both orders
  wins; one that flips with the order is a tie (position bias, Zheng et al. 2023, MT-Bench),
  so a judge that always says "A" produces ties, never a wrong winner.

The parsers never raise: a model may answer anything, and a bad answer costs one request.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from pipeline.backends import Request, Response
from pipeline.errors import UserError
from pipeline.lang import language_of

PROMPT_DIR = Path(__file__).parent / "prompt_files"
SCORE_MIN, SCORE_MAX = 1, 5
DIGITS = tuple(str(d) for d in range(SCORE_MIN, SCORE_MAX + 1))
LETTERS = ("A", "B")
Scoring = Literal["text", "probs"]
Winner = Literal["a", "b", "tie"]

# OpenAI's API allows at most 20 alternatives per token; a digit the judge was told to write
# is almost always among them, and the expectation is renormalised over the digits found.
TOP_LOGPROBS = 20
# The expectation reads only the first answer token's alternatives; nothing after it is needed.
PROBS_MAX_TOKENS = 1
# Below this total probability on the five digits the model was not going to answer with a
# digit at all, and the expectation would be noise: the reply is read as text instead.
MIN_DIGIT_MASS = 1e-6
# Two letter probabilities this close (relative to their sum) are a tie, not a preference.
PAIRWISE_TIE_MARGIN = 0.05
# A reason longer than this is a model that rambled: kept, but cut, so records stay readable.
MAX_REASON_CHARS = 400
# How much of an unreadable reply the re-ask quotes back.
MAX_QUOTED_CHARS = 200
HASH_CHARS = 16  # of the rubric's SHA-256: enough to tell two rubrics apart in a record

LABELS = {
    "en": {"instruction": "[Instruction]", "input": "[Input]",
           "reference": "[Reference answer: correct; compare the answer with it]"},
    "ja": {"instruction": "【指示】", "input": "【入力】", "reference": "【参考解答（正解です。これと比べてください）】"},
}
FORMATS = {
    ("pointwise", "text", "en"): 'Reply with a JSON object only, in this shape: '
                                 '{"reason": "<one or two sentences>", "score": <an integer from 1 to 5>}',
    ("pointwise", "text", "ja"): '次の形のJSONだけで答えてください：{"reason": "<日本語で一、二文の理由>", "score": <1から5の整数>}',
    ("pointwise", "probs", "en"): "Reply with the score only: one digit from 1 to 5.",
    ("pointwise", "probs", "ja"): "評価を1から5の数字一つだけで答えてください。",
    ("pairwise", "text", "en"): 'Reply with a JSON object only, in this shape: '
                                '{"reason": "<one or two sentences>", "winner": "A" or "B" or "tie"}',
    ("pairwise", "text", "ja"): '次の形のJSONだけで答えてください：{"reason": "<日本語で一、二文の理由>", "winner": "A" か "B" か "tie"}',
    ("pairwise", "probs", "en"): "Reply with the letter of the better answer only: A or B.",
    ("pairwise", "probs", "ja"): "良い方の回答の記号を、AかBの一文字だけで答えてください。",
}
REASK = {"en": "Your previous reply could not be read as a score:\n{reply}\n\n",
         "ja": "前の返答からは評価を読み取れませんでした：\n{reply}\n\n"}
REQUIRED_SLOTS = {"pointwise": ("{question}", "{answer}"), "pairwise": ("{question}", "{answer_a}", "{answer_b}")}

POINTWISE_SCHEMA = {"type": "json_schema", "json_schema": {"name": "judgement", "strict": True, "schema": {
    "type": "object",
    # reason first: a model that writes its reason before its score scores more carefully
    "properties": {"reason": {"type": "string"}, "score": {"type": "integer", "enum": list(range(SCORE_MIN, SCORE_MAX + 1))}},
    "required": ["reason", "score"], "additionalProperties": False}}}
PAIRWISE_SCHEMA = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["reason", "winner"], "additionalProperties": False}}}


def resolve_scoring(requested: str, backend: str) -> Scoring:
    """`--scoring auto`: probabilities on the local backend (one forward pass, never unreadable),
    text from a server (which may not return log-probabilities at all); otherwise as asked."""
    if requested != "auto":
        return requested
    return "probs" if backend == "local" else "text"


@dataclass(frozen=True)
class JudgeSettings:
    """How to ask: the part of a stage's flags that shapes a judge request."""

    scoring: Scoring = "text"
    structured: bool = True  # send response_format json_schema (text scoring)
    temperature: float = 0.0  # a judgement, not a creative answer
    max_tokens: int = 256
    seed: int | None = None
    rubric: str | None = None  # a file replacing the built-in pointwise rubric (both languages)
    pairwise_rubric: str | None = None  # the same for pairwise prompts


@dataclass(frozen=True)
class Rubric:
    name: str  # the built-in file's stem or the user's file name
    text: str
    sha256: str  # first HASH_CHARS hex digits of the text's SHA-256


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge: the task, the answer and, when known, a reference answer."""

    key: str
    instruction: str
    answer: str
    input: str = ""
    reference: str = ""
    language: str = ""  # "" -> from the instruction

    @property
    def lang(self) -> str:
        return self.language or language_of(self.instruction)


@dataclass
class Judgement:
    score: float | None = None  # int for text scoring, expectation for probs; None: unparsed or failed
    reason: str = ""
    scoring: str = ""
    parsed_as: str = ""  # json, brackets, labelled, fraction, ja_points, bare, probs
    distribution: dict[str, float] | None = None  # probs: P(digit), renormalised over the digits
    digit_mass: float | None = None  # probs: total probability the five digits had before that
    reasked: bool = False
    error: str | None = None  # the request failed after all retries (not a parsing failure)
    responses: list[Response] = field(default_factory=list)
    rubric: Rubric | None = None

    @property
    def unparsed(self) -> bool:
        return self.score is None and self.error is None


def score_bucket(score: float) -> int:
    """The integer step a score counts under in histograms: probability scores round half up."""
    return min(SCORE_MAX, max(SCORE_MIN, int(score + 0.5)))


def record_score(record: dict) -> float | None:
    """The judge's score a record carries (`judge.score`), or None for an unjudged or unreadable one."""
    verdict = record.get("judge")
    score = verdict.get("score") if isinstance(verdict, dict) else None
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None


# ---------------------------------------------------------------- rubrics and prompts


def rubric_path(kind: str, language: str) -> Path:
    return PROMPT_DIR / f"judge_{kind}_{language}.txt"


def load_rubric(kind: str, language: str, path: str | Path | None = None) -> Rubric:
    """The rubric for `kind` (pointwise, pairwise) in `language`, or the user's file at `path`."""
    source = Path(path) if path else rubric_path(kind, language)
    flag = "--rubric" if path else "rubric file"
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag} {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {source}: cannot read it ({e})") from None
    missing = [slot for slot in REQUIRED_SLOTS[kind] if slot not in text]
    if missing:
        raise UserError(f"{flag} {source}: has no {', '.join(missing)} slot, so the judge would not see the "
                        f"{'task' if '{question}' in missing else 'answer'}")
    name = source.name if path else source.stem
    return Rubric(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS])


def question_block(instruction: str, given: str, reference: str, language: str) -> str:
    labels = LABELS[language]
    parts = [f"{labels['instruction']}\n{instruction.strip()}"]
    if given.strip():
        parts.append(f"{labels['input']}\n{given.strip()}")
    if reference.strip():
        parts.append(f"{labels['reference']}\n{reference.strip()}")
    return "\n\n".join(parts)


def render(rubric: Rubric, format_text: str, **slots: str) -> str:
    """Fill the slots; a rubric without `{format}` gets the reply format at its end."""
    text = rubric.text
    if "{format}" not in text:
        text = text.rstrip() + "\n\n{format}\n"
    # {format} last: a model's answer quoted in a slot may itself contain "{format}".
    for name, value in slots.items():
        text = text.replace("{" + name + "}", value)
    return text.replace("{format}", format_text)


def pointwise_prompt(item: JudgeItem, settings: JudgeSettings, rubric: Rubric) -> str:
    language = item.lang
    return render(rubric, FORMATS[("pointwise", settings.scoring, language)],
                  question=question_block(item.instruction, item.input, item.reference, language),
                  answer=item.answer.strip())


def _request(key: str, text: str, settings: JudgeSettings, kind: str, tokens: tuple[str, ...]) -> Request:
    common = dict(key=key, messages=({"role": "user", "content": text},), temperature=settings.temperature,
                  top_p=1.0, seed=settings.seed)
    if settings.scoring == "probs":
        return Request(**common, max_tokens=PROBS_MAX_TOKENS, top_logprobs=TOP_LOGPROBS, logprob_tokens=tokens)
    schema = (POINTWISE_SCHEMA if kind == "pointwise" else PAIRWISE_SCHEMA) if settings.structured else None
    return Request(**common, max_tokens=settings.max_tokens,
                   response_format=json.dumps(schema, sort_keys=True) if schema else None)


def pointwise_request(item: JudgeItem, settings: JudgeSettings, rubric: Rubric) -> Request:
    return _request(item.key, pointwise_prompt(item, settings, rubric), settings, "pointwise", DIGITS)


def reask_request(item: JudgeItem, settings: JudgeSettings, rubric: Rubric, reply: str) -> Request:
    """The one second chance: the same prompt, the unreadable reply quoted, the format again.

    Always asked for JSON text (probability scoring never needs it: a reply without digit
    probabilities is read as text, and this is what a text reply gets).
    """
    text_settings = JudgeSettings(scoring="text", structured=settings.structured, temperature=settings.temperature,
                                  max_tokens=settings.max_tokens, seed=settings.seed)
    prompt = pointwise_prompt(item, text_settings, rubric)
    quoted = " ".join(reply.split())[:MAX_QUOTED_CHARS] or "(empty)"
    note = REASK[item.lang].format(reply=quoted) + FORMATS[("pointwise", "text", item.lang)]
    return _request(item.key, prompt.rstrip() + "\n\n" + note, text_settings, "pointwise", DIGITS)


# ---------------------------------------------------------------- reading replies

# Labels a score follows: "Score: 4", "Rating = 4", "**Score**: 4", "Score (1-5): 4", "評価：4", "点数は4".
# The scale a label may name ("1-5") is skipped, and a digit that starts a range is not a score.
_RANGE = r"\s*(?:-|–|~|〜|to)\s*\d"
_LABELLED = re.compile(r"(?:score|rating|grade|評価|点数|スコア|得点)(?:\s*\(?\s*1" + _RANGE + r"\s*\)?)?"
                       r"\W{0,4}?(?:は|:|=)?\s*\**\s*\[?\s*([1-5])(?!\d|\.\d|" + _RANGE + ")", re.IGNORECASE)
_BRACKETS = re.compile(r"\[\[\s*([1-5])(?:\.0)?\s*\]\]")
_FRACTION = re.compile(r"(?<![\d.])([1-5])\s*(?:/|out of|of)\s*5(?![\d.])", re.IGNORECASE)
# 「5点満点中4点」「4点」; a bare 「5点満点」 names the scale, not the score.
_JA_OUT_OF = re.compile(r"5\s*点\s*(?:満点)?\s*中\s*([1-5])\s*点")
_JA_POINTS = re.compile(r"(?<![\d.])([1-5])\s*点(?!\s*満点)")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _normalise(text: str) -> str:
    # NFKC turns full-width digits and colons (４、：) into ASCII ones.
    return unicodedata.normalize("NFKC", text or "").strip()


def _json_objects(text: str) -> Iterator[dict]:
    """Every JSON object that starts at a `{` in `text`, in order."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


def _as_score(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"\d+(?:\.0+)?", value):
            return None
        value = float(value)
    if isinstance(value, (int, float)) and float(value).is_integer() and SCORE_MIN <= value <= SCORE_MAX:
        return int(value)
    return None


def _reason_around(text: str, match: re.Match) -> str:
    rest = (text[:match.start()] + " " + text[match.end():]).strip(" \n:：-*")
    return one_line(rest)


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:MAX_REASON_CHARS]


def parse_score(text: str) -> tuple[int, str, str] | None:
    """(score, reason, which shape it was) from a judge's reply, or None when no shape fits."""
    text = _FENCE.sub("", _normalise(text))
    for obj in _json_objects(text):
        if "score" in obj or "rating" in obj:
            score = _as_score(obj.get("score", obj.get("rating")))
            if score is not None:
                return score, one_line(obj.get("reason") or obj.get("explanation") or ""), "json"
    if re.fullmatch(r"[*\s\[(]*([1-5])[*\s\].)]*", text):
        return int(re.search(r"[1-5]", text).group()), "", "bare"
    for name, pattern in (("brackets", _BRACKETS), ("labelled", _LABELLED), ("fraction", _FRACTION),
                          ("ja_points", _JA_OUT_OF), ("ja_points", _JA_POINTS)):
        match = pattern.search(text)
        if match:
            return int(match.group(1)), _reason_around(text, match), name
    return None


_WINNER_BRACKETS = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_WINNER_LABELLED = re.compile(r"(?:winner|verdict|better(?: answer)?|勝者|判定|良い方)\W{0,4}?(?:は|:)?\s*\**\s*"
                              r"(?:answer|回答)?\s*([AB])\b", re.IGNORECASE)
_WINNER_SENTENCE = re.compile(r"(?:answer|回答)\s*([AB])\s*(?:is better|is the better|の方が(?:良い|よい|優れ)|が(?:良い|よい|優れ))",
                              re.IGNORECASE)
_TIE_WORDS = {"tie", "c", "draw", "引き分け", "同等"}


def parse_winner(text: str) -> tuple[str, str] | None:
    """("A" | "B" | "tie", reason) from a pairwise reply, or None."""
    text = _FENCE.sub("", _normalise(text))
    for obj in _json_objects(text):
        winner = str(obj.get("winner", obj.get("better", ""))).strip()
        if winner.upper() in LETTERS:
            return winner.upper(), one_line(obj.get("reason") or "")
        if winner.lower() in _TIE_WORDS:
            return "tie", one_line(obj.get("reason") or "")
    bare = text.strip(" *.\n「」\"'()[]")
    if bare.upper() in LETTERS:
        return bare.upper(), ""
    if bare.lower() in _TIE_WORDS:
        return "tie", ""
    for pattern in (_WINNER_BRACKETS, _WINNER_LABELLED, _WINNER_SENTENCE):
        match = pattern.search(text)
        if match:
            letter = match.group(1).upper()
            return ("tie" if letter in ("C", "TIE") else letter), _reason_around(text, match)
    return None


def token_probabilities(logprobs: dict[str, float], wanted: tuple[str, ...]) -> dict[str, float]:
    """P(each wanted token) from first-token alternatives; " 4" and "4" are the same answer."""
    probs = dict.fromkeys(wanted, 0.0)
    for token, logprob in logprobs.items():
        key = _normalise(token)
        if key in probs and logprob is not None and math.isfinite(logprob):
            probs[key] += math.exp(logprob)
    return probs


def expected_score(logprobs: dict[str, float]) -> tuple[float, dict[str, float], float] | None:
    """(expectation over the digits, their renormalised distribution, their total mass), or None."""
    probs = token_probabilities(logprobs, DIGITS)
    mass = sum(probs.values())
    if mass < MIN_DIGIT_MASS:
        return None
    distribution = {digit: p / mass for digit, p in probs.items()}
    score = sum(int(digit) * p for digit, p in distribution.items())
    return score, {d: round(p, 4) for d, p in distribution.items()}, mass


def read_judgement(response: Response, settings: JudgeSettings) -> Judgement:
    """A Judgement from one response: probabilities when there are any, else the reply's text."""
    judgement = Judgement(responses=[response])
    if response.error is not None or not response.texts:
        judgement.error = response.error or "no answer"
        return judgement
    alternatives = (getattr(response, "top_logprobs", None) or [None])[0]
    if settings.scoring == "probs" and alternatives:
        found = expected_score(alternatives)
        if found is not None:
            score, judgement.distribution, mass = found
            judgement.score, judgement.digit_mass = round(score, 4), round(mass, 6)
            judgement.scoring = judgement.parsed_as = "probs"
            return judgement
    parsed = parse_score(response.texts[0])
    judgement.scoring = "text"
    if parsed is not None:
        judgement.score, judgement.reason, judgement.parsed_as = parsed
    return judgement


# ---------------------------------------------------------------- streaming


def judge_items(client, items: Iterable[JudgeItem], settings: JudgeSettings,
                should_stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[JudgeItem, Judgement]]:
    """Score each item; an unreadable reply is asked again once. Yields in completion order.

    Items whose reply still does not parse come back with `unparsed` set; failed requests
    with `error`. `should_stop` is checked before each new request is sent (budgets).
    """
    rubrics: dict[str, Rubric] = {}

    def rubric_for(item: JudgeItem) -> Rubric:
        if item.lang not in rubrics:
            rubrics[item.lang] = load_rubric("pointwise", item.lang, settings.rubric)
        return rubrics[item.lang]

    pending: dict[str, JudgeItem] = {}
    second_chance: list[tuple[JudgeItem, Response]] = []

    def first_requests() -> Iterator[Request]:
        for item in items:
            if should_stop():
                return
            pending[item.key] = item
            yield pointwise_request(item, settings, rubric_for(item))

    for response in client.stream(first_requests()):
        item = pending.pop(response.request.key)
        judgement = read_judgement(response, settings)
        judgement.rubric = rubric_for(item)
        if judgement.unparsed:
            second_chance.append((item, response))
            continue
        yield item, judgement

    by_key = {item.key: (item, first) for item, first in second_chance}

    def reasks() -> Iterator[Request]:
        for item, first in second_chance:
            if should_stop():
                return
            yield reask_request(item, settings, rubric_for(item), first.texts[0] if first.texts else "")

    for response in client.stream(reasks()):
        item, first = by_key[response.request.key]
        judgement = read_judgement(response, JudgeSettings(scoring="text"))
        judgement.responses.insert(0, first)
        judgement.reasked, judgement.rubric = True, rubric_for(item)
        yield item, judgement


# ---------------------------------------------------------------- pairwise


@dataclass(frozen=True)
class Pair:
    """Two answers to one task; the verdict names them "a" and "b", whatever order they were shown in."""

    key: str
    instruction: str
    answer_a: str
    answer_b: str
    input: str = ""
    reference: str = ""
    language: str = ""

    @property
    def lang(self) -> str:
        return self.language or language_of(self.instruction)


@dataclass
class Verdict:
    winner: Winner | None  # None: a reply in either order could not be read, or a request failed
    flipped: bool = False  # each order preferred the answer shown first (or second): position bias
    orders: tuple[str | None, str | None] = (None, None)  # "a"/"b"/"tie" from (a, b) and from (b, a)
    reasons: tuple[str, str] = ("", "")
    p_a: tuple[float | None, float | None] = (None, None)  # probs: P(a) / (P(a) + P(b)) in each order
    responses: list[Response] = field(default_factory=list)
    rubric: Rubric | None = None


def pairwise_prompt(pair: Pair, first: str, second: str, settings: JudgeSettings, rubric: Rubric) -> str:
    language = pair.lang
    return render(rubric, FORMATS[("pairwise", settings.scoring, language)],
                  question=question_block(pair.instruction, pair.input, pair.reference, language),
                  answer_a=first.strip(), answer_b=second.strip())


def read_order(response: Response, settings: JudgeSettings) -> tuple[str | None, str, float | None]:
    """("A" | "B" | "tie" | None, reason, P(A) / (P(A) + P(B)) or None) of one ordering's reply."""
    if response.error is not None or not response.texts:
        return None, "", None
    alternatives = (getattr(response, "top_logprobs", None) or [None])[0]
    if settings.scoring == "probs" and alternatives:
        probs = token_probabilities(alternatives, LETTERS)
        total = probs["A"] + probs["B"]
        if total >= MIN_DIGIT_MASS:
            share = probs["A"] / total
            if abs(probs["A"] - probs["B"]) <= PAIRWISE_TIE_MARGIN * total:
                return "tie", "", round(share, 4)
            return ("A" if share > 0.5 else "B"), "", round(share, 4)
    parsed = parse_winner(response.texts[0])
    return (parsed[0], parsed[1], None) if parsed else (None, "", None)


def combine(first_order: str | None, second_order: str | None) -> tuple[Winner | None, bool, tuple]:
    """The verdict from the (a, b) reply and the (b, a) reply: (winner, flipped, per-order winners)."""
    as_shown = {"A": "a", "B": "b", "tie": "tie"}
    swapped = {"A": "b", "B": "a", "tie": "tie"}
    one = as_shown.get(first_order) if first_order else None
    two = swapped.get(second_order) if second_order else None
    if one is None or two is None:
        return None, False, (one, two)
    if one == two:
        return one, False, (one, two)
    # They disagree: either each order picked the same position (a flip), or one said tie.
    return "tie", "tie" not in (one, two), (one, two)


def pairwise_verdicts(client, pairs: Iterable[Pair], settings: JudgeSettings,
                      should_stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[Pair, Verdict]]:
    """Judge each pair in both orders; yield (pair, Verdict) once both replies are in."""
    rubrics: dict[str, Rubric] = {}
    waiting: dict[str, tuple[Pair, dict[str, Response]]] = {}

    def rubric_for(pair: Pair) -> Rubric:
        if pair.lang not in rubrics:
            rubrics[pair.lang] = load_rubric("pairwise", pair.lang, settings.pairwise_rubric)
        return rubrics[pair.lang]

    def requests() -> Iterator[Request]:
        for pair in pairs:
            if should_stop():
                return
            waiting[pair.key] = (pair, {})
            for order, (first, second) in (("ab", (pair.answer_a, pair.answer_b)), ("ba", (pair.answer_b, pair.answer_a))):
                text = pairwise_prompt(pair, first, second, settings, rubric_for(pair))
                yield _request(f"{pair.key}\x00{order}", text, settings, "pairwise", LETTERS)

    for response in client.stream(requests()):
        key, order = response.request.key.rsplit("\x00", 1)
        pair, replies = waiting[key]
        replies[order] = response
        if len(replies) < 2:
            continue
        del waiting[key]
        (one, reason_one, p_one), (two, reason_two, p_two) = (read_order(replies[o], settings) for o in ("ab", "ba"))
        winner, flipped, orders = combine(one, two)
        yield pair, Verdict(winner, flipped, orders, (reason_one, reason_two),
                            (p_one, None if p_two is None else round(1 - p_two, 4)),
                            [replies["ab"], replies["ba"]], rubric_for(pair))


def flip_share(verdicts: Iterable[Verdict]) -> float:
    """Share of verdicts read in both orders whose preferred answer changed with the order."""
    read = [v for v in verdicts if v.winner is not None]
    return sum(v.flipped for v in read) / len(read) if read else 0.0
