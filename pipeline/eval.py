"""Loss, token accuracy, sequence accuracy, exact match, BLEU, chrF and ROUGE of a model on
held-out data, beside a baseline, overall and per language, task kind and source.

    python -m pipeline eval --model runs/sft --baseline SmolLM2-135M-Instruct --data heldout   # unseen tasks
    python -m pipeline eval --model runs/sft --baseline SmolLM2-135M-Instruct --data runs/sft/val.jsonl
    python -m pipeline eval --data seeds            # every seed task's human-written instances
    python -m pipeline eval --predictions answers.jsonl --out answers.eval.json   # no model

Each model is scored twice on the same records and the same prompts: the template the tuned
model was trained with (`--template`, default: the one in `<model>/train_config.json`, else
alpaca), so the baseline shows what the model did with those prompts before fine-tuning:

- teacher-forced, batched: mean cross-entropy over the response tokens (token-weighted, as
  in training), perplexity = exp(loss), and token accuracy (argmax equals the label, response
  tokens only). Records whose response does not fit in `--max-length` at all are counted as
  dropped and left out of these three.
- generated: greedy decoding, batched with left padding, cut at EOS, then sequence accuracy
  (the generated token ids are the reference's, EOS reached), exact match (normalised: NFKC,
  whitespace, trailing 。．.!！), sacrebleu corpus BLEU (`ja-mecab` for Japanese) and chrF, and
  ROUGE-1/2/L F1 with precision and recall, against the reference `output` (see
  `pipeline.metrics`). Records sharing instruction and input are each other's extra references.
- broken down (`breakdown` in eval.json, tables in eval.md) by language, by task kind
  (classification: label accuracy; the others, e.g. generation or convert's qa: the text
  measures) and by source (seed, generated, converted); a measure that does not apply to a
  slice is absent, never 0.
- what the limits cut, per language (`counts.tuned.by_language`, and printed): records
  truncated or dropped at `--max-length`, references longer than `--max-new-tokens`
  (Japanese costs SmolLM2 about 1.7 tokens a character; see `pipeline.token_budget`).

`--data heldout` scores the instances of the held-out seed tasks (listed beside the seed file,
see `pipeline.seeds`): tasks kept out of generate's and respond's examples and out of mix, with
near-copies dropped by filter as `eval_overlap`, so they are unseen by the tuned model.

`--predictions FILE` scores records that already carry `output` and `prediction` (and, when
every record has it, `baseline_prediction`), so an API model's answers can be scored too;
sequence accuracy compares the texts with their ends stripped; the teacher-forced measures do
not apply there and are absent from the output, never 0.

Writes `eval.json` (`--out`): `{"metrics", "baseline", "breakdown", "config", "counts"}`, fractions from 0
to 1 except BLEU and chrF (0-100), the BLEU tokenizer of each language with its version in
`config.bleu_tokenize`; `eval.md` beside it (metric | base | tuned | delta, then one line per
measure saying what it is, also printed; written by `pipeline/eval_report.py`);
`eval_predictions.jsonl` with every record's predictions and scores; `eval.config.json`.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import metrics as M
from pipeline.batching import length_groups, token_budget
from pipeline.cards import refresh_model_card_eval
from pipeline.config import option, to_dict, validate, write_resolved_config
from pipeline.errors import UserError
from pipeline.eval_report import markdown_report
from pipeline.jsonl import (atomic_write, check_output_path, claim_outputs, load_records, locked_outputs, write_json_atomic,
                            write_jsonl_atomic)
from pipeline.greedy import eos_token_ids, generate_answers  # also finetune's --eval-generate
from pipeline.lang import language_of
from pipeline.records import TRAIN_CONFIG, train_settings, training_record_validator
from pipeline.seeds import DEFAULT_SEEDS, heldout_path_for, instance_records, load_seed_split, load_seeds
from pipeline.token_budget import describe as describe_cuts
from pipeline.token_budget import eval_cuts

DEFAULT_TEMPLATE = "alpaca"
# Stanford Alpaca's training length; used when the model folder does not say what it was trained with.
DEFAULT_MAX_LENGTH = 512
# Alpaca's responses average ~60 words (~80 tokens); 256 covers nearly all without letting a
# model that never emits EOS run for minutes on a CPU.
DEFAULT_MAX_NEW_TOKENS = 256
# Eight Alpaca-length records fit a 135M model's forward pass in well under 1 GB on a CPU;
# raise it on a GPU.
DEFAULT_BATCH_SIZE = 8
SEEDS_DATA = "seeds"  # the `--data` value that means the seed tasks' instances
HELDOUT_DATA = "heldout"  # the `--data` value that means the held-out (unseen) seed tasks' instances

BREAKDOWNS = ("language", "kind", "source")
CLASSIFICATION = "classification"
UNLIMITED_LENGTH = 1 << 30  # no cut: a reference's own token ids, whatever --max-length is
DEFAULT_JUDGE_MODEL = "SmolLM2-135M-Instruct"  # the embedded model, as every stage's default backend
JUDGE_CACHE = "judge_cache"  # beside eval.json: a rerun replays the judge's answers instead of paying again

PREDICTION_FIELDS = {
    "instruction": (str, False, False),
    "input": (str, False, False),
    "output": (str, True, False),
    "prediction": (str, True, False),
    "baseline_prediction": (str, False, False),
}


@dataclass(frozen=True)
class Config:
    model: str = option("runs/sft", "the model to evaluate: a Hugging Face folder, or SmolLM2-135M-Instruct")
    data: str = option("runs/sft/val.jsonl", f"held-out records (JSONL with instruction/input/output), `{HELDOUT_DATA}` for the "
                       f"unseen (held-out) seed tasks' instances, or `{SEEDS_DATA}` for every seed task's")
    baseline: str | None = option(None, "a second model scored the same way for comparison, e.g. the model before fine-tuning")
    out: str = option("runs/sft/eval.json", "where eval.json goes; eval.md and eval_predictions.jsonl go beside it")
    predictions: str | None = option(None, "score a JSONL whose records carry `output` and `prediction` (optionally `baseline_prediction`); no model is loaded")
    template: Literal["alpaca", "chat"] | None = option(None, f"prompt template (default: the one in <model>/{TRAIN_CONFIG}, else {DEFAULT_TEMPLATE})")
    max_length: int | None = option(None, f"token limit of prompt + response for the teacher-forced measures (default: <model>/{TRAIN_CONFIG}'s, else {DEFAULT_MAX_LENGTH})",
                                   min=2)
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "most tokens generated per answer", min=1)
    batch_size: int = option(DEFAULT_BATCH_SIZE, "records per forward pass and per generate call", min=1)
    limit: int | None = option(None, "evaluate only N records: the first of each language in turn", min=1)
    seeds: str = option(DEFAULT_SEEDS, f"the seed file `--data {SEEDS_DATA}` and `--data {HELDOUT_DATA}` read")
    device: str = option("auto", "cuda, mps, cpu, or auto")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "weights' precision (auto: bf16 on a GPU that has it; on a CPU fp32, except that answers are generated "
                "in bf16 where bf16 matmuls are native, as the local backend serves them)")
    judge_backend: Literal["local", "openai"] | None = option(None, "judge tuned against base on every record with this "
                                                                  "backend (pairwise, both orders; see pipeline.win_rate)")
    judge_base_url: str | None = option(None, "the judge's OpenAI-compatible server (default: $OPENAI_BASE_URL)")
    judge_model: str = option(DEFAULT_JUDGE_MODEL, "the judge: a model name (openai) or local model folder")
    judge_scoring: Literal["auto", "text", "probs"] = option(
        "auto", "how the judge answers: probs reads the verdict and the 1-5 score from the next token's probabilities "
                "(one forward pass each), text asks for JSON; auto: probs on the local backend, text on openai",
        choices=("auto", "text", "probs"))

    @property
    def resolved_judge_scoring(self) -> str:
        from pipeline.judging import resolve_scoring  # the judge stage's --scoring auto rule

        return resolve_scoring(self.judge_scoring, self.judge_backend)

    def __post_init__(self):
        validate(self)  # bounds from the field metadata; the rules between fields follow
        if self.predictions is not None and self.baseline is not None:
            raise UserError("--baseline: not used with --predictions (put `baseline_prediction` in the records instead)")
        if self.judge_backend is not None and self.predictions is None and self.baseline is None:
            raise UserError("--judge-backend: judges the tuned model against the base one: give --baseline too")
        if self.judge_backend is None and self.judge_base_url is not None:
            raise UserError("--judge-base-url: needs --judge-backend openai")


@dataclass
class Stats:
    metrics: dict[str, float]
    baseline: dict[str, float] | None
    counts: dict
    out: Path
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)


@dataclass
class ModelScores:
    """One model's results on the records: set-level metrics, per-record details, counts."""

    metrics: dict[str, float]
    predictions: list[str]
    # Per record: teacher-forced (summed loss, argmax hits, tokens), None where nothing was scored.
    record_sums: list[tuple[float, int, int] | None]
    sequence_hits: list[bool]
    counts: dict

    def record_loss(self, i: int) -> float | None:
        sums = self.record_sums[i]
        return None if sums is None else sums[0] / sums[2]


@dataclass(frozen=True)
class EvalSet:
    """The records with what every measure needs about each: its references, language, kind, source."""

    records: list[dict]
    references: list[list[str]]  # its own reference first, then those of records with the same prompt
    languages: list[str]
    kinds: list[str]
    sources: list[str]

    def slices(self, dimension: str) -> dict[str, list[int]]:
        values = {"language": self.languages, "kind": self.kinds, "source": self.sources}[dimension]
        return {value: [i for i, v in enumerate(values) if v == value] for value in sorted(set(values))}


def kind_of(record: dict) -> str:
    """`classification`, convert's task kind (qa, translation, ...), else `generation`."""
    if record.get("is_classification") is True or record.get("kind") == CLASSIFICATION:
        return CLASSIFICATION
    kind = record.get("kind")
    return kind if isinstance(kind, str) and kind else "generation"


def source_of(record: dict) -> str:
    """`seed` (human-written), `converted` (from a dataset by `convert`) or `generated` (the pipeline's own)."""
    if record.get("source") == "seed":
        return "seed"
    return "converted" if "source_row" in record else "generated"


def prompt_key(record: dict) -> str:
    """What makes two records the same question: instruction and input, or every turn before the answer."""
    if "messages" in record:
        return repr([(turn["role"], turn["content"]) for turn in record["messages"][:-1]])
    return repr((record.get("instruction", ""), record.get("input") or ""))


def build_eval_set(records: list[dict]) -> EvalSet:
    own = [reference_of(r) for r in records]
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(prompt_key(record), []).append(i)
    references = [[own[i]] + [own[j] for j in groups[prompt_key(r)] if j != i] for i, r in enumerate(records)]
    return EvalSet(records, references, [language_of(ref) for ref in own], [kind_of(r) for r in records],
                   [source_of(r) for r in records])


def output_paths(out) -> tuple[Path, Path, Path]:
    """eval.json, and the eval.md and eval_predictions.jsonl beside it."""
    out = Path(out)
    stem = out.name.rsplit(".", 1)[0]
    return out, out.with_name(stem + ".md"), out.with_name(stem + "_predictions.jsonl")


def load_eval_records(cfg: Config) -> list[dict]:
    """The records to score, all validated, then cut to `--limit`."""
    if cfg.predictions is not None:
        records = load_records(cfg.predictions, PREDICTION_FIELDS)
    elif cfg.data == SEEDS_DATA:
        records = instance_records(load_seeds(cfg.seeds))
    elif cfg.data == HELDOUT_DATA:
        heldout = load_seed_split(cfg.seeds).heldout
        if not heldout:
            raise UserError(f"--data {HELDOUT_DATA}: {cfg.seeds} has no held-out tasks: list their ids in "
                            f"{heldout_path_for(cfg.seeds)} (`python -m pipeline.seeds {cfg.seeds}` writes a seeded choice)")
        records = instance_records(heldout)
    else:
        # What finetune trains on, with the reference answer as the last turn.
        records = load_records(cfg.data, validate=training_record_validator(cfg.data, reference_last=True))
    if cfg.limit is not None:
        records = spread_over_languages(records, cfg.limit)
    return records


def spread_over_languages(records: list[dict], limit: int) -> list[dict]:
    """The first `limit` records, taken in turn from each language (file order within one) and
    kept in file order: a short eval of a set that lists its English tasks first still scores
    the Japanese ones."""
    queues: dict[str, deque[int]] = {}
    for i, record in enumerate(records):
        queues.setdefault(language_of(reference_of(record)), deque()).append(i)
    chosen: list[int] = []
    while len(chosen) < min(limit, len(records)):
        for queue in queues.values():
            if queue and len(chosen) < limit:
                chosen.append(queue.popleft())
    return [records[i] for i in sorted(chosen)]


def reference_of(record: dict) -> str:
    """The answer a prediction is scored against: `output`, or the last assistant turn."""
    return record["output"] if "output" in record else record["messages"][-1]["content"]


@locked_outputs
def run(cfg: Config, *, client=None) -> Stats:
    started = time.perf_counter()
    out, md_path, predictions_path = output_paths(cfg.out)
    for path in (out, md_path, predictions_path):
        check_output_path(path, "--out")
    models = [m for m in (cfg.model, cfg.baseline) if cfg.predictions is None and m]
    claim_outputs({"--data": None if cfg.data in (SEEDS_DATA, HELDOUT_DATA) else cfg.data, "--seeds": cfg.seeds,
                   "--predictions": cfg.predictions, "--model": [Path(m) / name for m in models for name in ("config.json", TRAIN_CONFIG)]},
                  {"--out": [out, md_path, predictions_path]})
    data = build_eval_set(load_eval_records(cfg))
    languages = data.languages
    counts: dict = {"records": len(data.records), "languages": {lang: languages.count(lang) for lang in sorted(set(languages))},
                    "with_several_references": sum(len(refs) > 1 for refs in data.references)}
    resolved: dict = {}

    if cfg.predictions is not None:
        tuned, base, names = score_predictions(data, cfg)
    else:
        tuned, base, names, resolved = score_models(data, cfg)
        counts["tuned"] = tuned.counts
        if base is not None:
            counts["baseline"] = base.counts

    result = {"metrics": tuned.metrics}
    if base is not None:
        result["baseline"] = base.metrics
    result["breakdown"] = breakdown(data, tuned, base)
    judged = None
    if cfg.judge_backend is not None:
        judged = judged_comparison(cfg, data, tuned, base, client)
        result["judge"] = judged.summary
    # The tokenizer with its version (`ja-mecab-0.996-IPA`): BLEU is only comparable under the same one.
    tokenizers = {lang: M.bleu_tokenizer_signature(lang) for lang in sorted(set(languages))}
    result["config"] = {**to_dict(cfg), **resolved, "bleu_tokenize": tokenizers}
    result["counts"] = counts
    seconds = time.perf_counter() - started
    result["seconds"] = round(seconds, 2)

    table = markdown_report(result, names, report_title(cfg, data), f"{cfg.judge_backend} judge {cfg.judge_model}",
                            tokenizers)
    write_jsonl_atomic(predictions_path, prediction_rows(data, tuned, base, judged.per_record if judged else None))
    write_json_atomic(out, result)
    with atomic_write(md_path) as f:
        f.write(table)
    if cfg.predictions is None:  # the model's own card (finetune's README.md) shows its latest evaluation
        refresh_model_card_eval(cfg.model, table)
    write_resolved_config(cfg, out, {"resolved": resolved})
    print(table)
    print_counts(counts)
    print(f"{len(data.records):,} records ({', '.join(f'{n} {lang}' for lang, n in counts['languages'].items())}) in {seconds:.1f} s; "
          f"wrote {out}, {md_path}, {predictions_path}")
    return Stats(tuned.metrics, base.metrics if base else None, counts, out, seconds, [out, md_path, predictions_path])


def judged_comparison(cfg: Config, data: EvalSet, tuned: ModelScores, base: ModelScores | None, client=None):
    """`pipeline.win_rate.compare` of the two answers of every record, with the judge from the flags."""
    from pipeline.backends import BackendOptions, open_client
    from pipeline.judging import JudgeSettings
    from pipeline.win_rate import Compared, compare

    if base is None:
        raise UserError(f"--judge-backend: {cfg.predictions}: every record needs `baseline_prediction` to compare with")
    options = BackendOptions(backend=cfg.judge_backend, model=cfg.judge_model, base_url=cfg.judge_base_url,
                             device=cfg.device, cache_dir=str(Path(cfg.out).parent / JUDGE_CACHE))
    items = [Compared(f"r{i}", *question_of(record), data.references[i][0], tuned.predictions[i], base.predictions[i],
                      data.languages[i]) for i, record in enumerate(data.records)]
    judge = open_client(options, client)
    try:
        return compare(judge, items, JudgeSettings(scoring=cfg.resolved_judge_scoring))
    finally:
        judge.close()


def question_of(record: dict) -> tuple[str, str]:
    """(instruction, input) as the judge is shown them: a chat record's last user turn is its instruction."""
    if "messages" in record:
        return next(t["content"] for t in reversed(record["messages"][:-1]) if t["role"] == "user"), ""
    return record.get("instruction", ""), record.get("input") or ""


def print_counts(counts: dict) -> None:
    for label in ("tuned", "baseline"):
        if label in counts:
            c = counts[label]
            print(f"{label}: {c['scored_records']:,} records teacher-forced ({c['dropped']} dropped, {c['truncated']} truncated, "
                  f"{c['response_tokens']:,} response tokens); {c['generated_tokens']:,} tokens generated, "
                  f"{c['hit_max_new_tokens']} answers hit --max-new-tokens, {c['empty_predictions']} empty; {c['seconds']:.1f} s"
                  + (f" (teacher-forced in {c['precision']['teacher_forced']}, generated in {c['precision']['generate']})"
                     if "precision" in c else ""))
            print(f"{label}: cut per language: {describe_cuts(c['by_language'])}")


def set_metrics(data: EvalSet, predictions: list[str], sequence_hits: list[bool],
                teacher_forced_sums: tuple[float, int, int] | None = None) -> dict[str, float]:
    """Every measure of one model on the whole set; `label_accuracy` when it has classification records."""
    metrics = M.teacher_forced_metrics(*teacher_forced_sums) if teacher_forced_sums else {}
    metrics.update(M.generation_metrics(predictions, data.references, data.languages, sequence_hits))
    classified = data.slices("kind").get(CLASSIFICATION)
    if classified:
        metrics.update(M.slice_metrics(classified, predictions, data.references, data.languages, classification=True))
    return metrics


def score_predictions(data: EvalSet, cfg: Config) -> tuple[ModelScores, ModelScores | None, dict]:
    """`--predictions`: the answers are in the records; `baseline_prediction` too when every record has one."""

    def scores(key: str) -> ModelScores:
        preds = [r[key] for r in data.records]
        hits = [M.matches_any(M.same_text, p, refs) for p, refs in zip(preds, data.references)]
        return ModelScores(set_metrics(data, preds, hits), preds, [None] * len(preds), hits, {})

    tuned = scores("prediction")
    base = scores("baseline_prediction") if all("baseline_prediction" in r for r in data.records) else None
    return tuned, base, {"tuned": cfg.predictions, "base": "baseline_prediction" if base else None}


def score_models(data: EvalSet, cfg: Config) -> tuple[ModelScores, ModelScores | None, dict, dict]:
    """Both models on the records, with the template and length the tuned one was trained with."""
    from pipeline.models import load_tokenizer, resolve_model
    from pipeline.templates import prompt_ids

    records = data.records
    settings = train_settings(resolve_model(cfg.model))
    resolved = {"template": cfg.template or settings.get("template", DEFAULT_TEMPLATE),
                "max_length": cfg.max_length or int(settings.get("max_length", DEFAULT_MAX_LENGTH))}
    if resolved["template"] == "alpaca" and any("messages" in r for r in records):
        raise UserError(f"--template alpaca: {cfg.data} holds `messages` records, which need --template chat")
    names = [cfg.model] + ([cfg.baseline] if cfg.baseline is not None else [])
    # Fail now, not after the first model's run: a wrong folder, or a tokenizer without a chat template.
    for name in names:
        try:
            prompt_ids(records[0], resolved["template"], load_tokenizer(name))
        except ValueError as e:
            raise UserError(f"--template {resolved['template']}: {name}: {e}") from None
    tuned = score_model(cfg.model, data, cfg, resolved, "tuned")
    base = None
    if cfg.baseline is not None:
        base = score_model(cfg.baseline, data, cfg, resolved, "base")
    return tuned, base, {"tuned": cfg.model, "base": cfg.baseline}, resolved


def score_model(name: str, data: EvalSet, cfg: Config, resolved: dict, label: str) -> ModelScores:
    """Load one model, run both kinds of measure on the records, and free it again."""
    from pipeline.models import load_model, load_tokenizer, precision_name

    started = time.perf_counter()
    records, template = data.records, resolved["template"]
    tokenizer = load_tokenizer(name)
    model = load_model(name, device=cfg.device, dtype=cfg.dtype)
    try:
        sums, record_sums, tf_counts = teacher_forced(model, tokenizer, records, template,
                                                      resolved["max_length"], cfg.batch_size, label)
        precisions = {"teacher_forced": precision_name(model.dtype)}
        model = model.to(generation_dtype(cfg, model))
        precisions["generate"] = precision_name(model.dtype)
        predictions, gen_counts, answer_ids = generate_answers(model, tokenizer, records, template,
                                                               cfg.max_new_tokens, cfg.batch_size, label)
        eos_ids = eos_token_ids(model, tokenizer)
    finally:
        del model
        gc.collect()
        _empty_device_cache()
    hits = [ids is not None and any(ids == reference_answer_ids(r, ref, tokenizer, template, eos_ids) for ref in refs)
            for r, refs, ids in zip(records, data.references, answer_ids)]
    metrics = set_metrics(data, predictions, hits, sums)
    seconds = round(time.perf_counter() - started, 2)
    own = [refs[0] for refs in data.references]
    cuts = eval_cuts(tokenizer, records, own, data.languages, template, resolved["max_length"], cfg.max_new_tokens)
    return ModelScores(metrics, predictions, record_sums, hits, {**tf_counts, **gen_counts, "by_language": cuts,
                                                                 "precision": precisions, "seconds": seconds})


def generation_dtype(cfg: Config, model):
    """The precision answers are generated in: the loaded one, except bf16 on a CPU with bf16 matmul
    units under --dtype auto. Generation is most of eval's time and bf16 decodes 2.7x faster there
    (bench/bench_local.py), choosing fp32's next token at 98% of positions; the teacher-forced
    loss stays in fp32, where a small difference is the measure itself."""
    import torch

    from pipeline.models import local_dtype

    if cfg.dtype == "auto" and model.device.type == "cpu" and local_dtype("cpu") == "bf16":
        return torch.bfloat16
    return model.dtype


def reference_answer_ids(record: dict, reference: str, tokenizer, template: str, eos_ids: list[int]) -> list[int]:
    """The token ids training teaches as `record`'s answer when it is `reference`, up to its EOS:
    what `sequence_accuracy` compares a generated answer (cut at EOS) with."""
    from pipeline.templates import encode_example

    if "messages" in record:
        record = {**record, "messages": record["messages"][:-1] + [{**record["messages"][-1], "content": reference}]}
    else:
        record = {**record, "output": reference}
    example = encode_example(record, tokenizer, template, max_length=UNLIMITED_LENGTH)
    ids = [t for t, label in zip(example.input_ids, example.labels) if label != M.IGNORE_INDEX]
    end = next((k for k, t in enumerate(ids) if t in eos_ids), len(ids))
    return ids[:end]


def breakdown(data: EvalSet, tuned: ModelScores, base: ModelScores | None) -> dict:
    """`{dimension: {slice: {"records", "tuned", "baseline"}}}` for language, kind and source."""
    out: dict = {}
    for dimension in BREAKDOWNS:
        out[dimension] = {}
        for value, indices in data.slices(dimension).items():
            classification = dimension == "kind" and value == CLASSIFICATION
            entry = {"records": len(indices), "tuned": slice_scores(indices, data, tuned, classification)}
            if base is not None:
                entry["baseline"] = slice_scores(indices, data, base, classification)
            out[dimension][value] = entry
    return out


def slice_scores(indices: list[int], data: EvalSet, scores: ModelScores, classification: bool) -> dict[str, float]:
    """One model's measures on one slice: label accuracy for classification, else teacher-forced and text measures."""
    text = M.slice_metrics(indices, scores.predictions, data.references, data.languages, scores.sequence_hits,
                           classification)
    if classification:
        return text
    sums = [scores.record_sums[i] for i in indices if scores.record_sums[i] is not None]
    teacher = M.teacher_forced_metrics(*(sum(column) for column in zip(*sums))) if sums else {}
    return {**teacher, **text}


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def teacher_forced(model, tokenizer, records: list[dict], template: str, max_length: int,
                   batch_size: int, label: str) -> tuple[tuple[float, int, int], list[tuple[float, int, int] | None], dict]:
    """Summed response cross-entropy, argmax hits and token count over `records`, plus the same
    three per record (None when its response was cut away entirely), for the breakdowns."""
    import torch
    from tqdm import tqdm

    from pipeline.templates import encode_example

    encoded = [encode_example(r, tokenizer, template, max_length) for r in records]
    kept = [i for i, e in enumerate(encoded) if e.num_trained_tokens > 0]
    # Similar lengths in one batch, within a padded-token budget (`batching.length_groups`):
    # little padding, and the longest batch runs first so an out-of-memory error comes at once.
    batches = [[kept[k] for k in group] for group in
               length_groups([len(encoded[i].input_ids) for i in kept], token_budget(model.device), batch_size)]
    pad_id = tokenizer.pad_token_id
    device = model.device
    record_sums: list[tuple[float, int, int] | None] = [None] * len(records)
    loss_sum, correct, tokens = 0.0, 0, 0
    with torch.inference_mode(), tqdm(total=len(kept), desc=f"{label}: teacher-forced", unit="rec") as bar:
        for batch in batches:
            width = max(len(encoded[i].input_ids) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), M.IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(encoded[i].input_ids)
                input_ids[row, :n] = torch.as_tensor(encoded[i].input_ids)
                labels[row, :n] = torch.as_tensor(encoded[i].labels)
                attention[row, :n] = 1
            # Logits only from the position before the earliest response token on: the LM head
            # over the whole vocabulary is a large share of the work for a small model.
            first_label = int((labels != M.IGNORE_INDEX).float().argmax(dim=1).min())
            keep = width - max(first_label - 1, 0)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            try:
                logits = model(**inputs, logits_to_keep=keep).logits
            except TypeError:  # an older architecture without `logits_to_keep`: all positions
                keep = width
                logits = model(**inputs).logits
            sums = M.token_sums(logits, labels[:, width - keep:].to(device))
            for row, i in enumerate(batch):
                record_sums[i] = (sums.loss[row], sums.correct[row], sums.tokens[row])
            loss_sum += sum(sums.loss)
            correct += sum(sums.correct)
            tokens += sum(sums.tokens)
            bar.update(len(batch))
    counts = {"scored_records": len(kept), "response_tokens": tokens,
              "truncated": sum(e.truncated for e in encoded), "dropped": len(records) - len(kept)}
    return (loss_sum, correct, tokens), record_sums, counts


def prediction_rows(data: EvalSet, tuned: ModelScores, base: ModelScores | None,
                    judged: dict[str, dict] | None = None) -> list[dict]:
    """One readable line per record: the reference(s), each model's answer, its scores and the judge's verdict."""
    rows = []
    for i, record in enumerate(data.records):
        row = {key: record[key] for key in ("id", "task_id", "instruction", "input") if key in record}
        if "messages" in record:
            row["messages"] = record["messages"][:-1]
        refs = data.references[i]
        row.update(output=refs[0], language=data.languages[i], kind=data.kinds[i], source=data.sources[i])
        if len(refs) > 1:
            row["other_references"] = refs[1:]
        for prefix, scores in (("", tuned), ("baseline_", base)):
            if scores is None:
                continue
            prediction = scores.predictions[i]
            row[f"{prefix}prediction"] = prediction
            row[f"{prefix}sequence_match"] = scores.sequence_hits[i]
            row[f"{prefix}exact_match"] = M.matches_any(M.exact_match, prediction, refs)
            row[f"{prefix}rouge_l"] = round(M.best_rouge(M.rouge_l, prediction, refs).f1, 4)
            if scores.record_sums[i] is not None:
                row[f"{prefix}loss"] = round(scores.record_loss(i), 4)
        if judged is not None:
            row["judge"] = judged[f"r{i}"]
        rows.append(row)
    return rows


def report_title(cfg: Config, data: EvalSet) -> list[str]:
    n = len(data.records)
    if cfg.predictions is None and cfg.data == HELDOUT_DATA:
        tasks = len({r.get("task_id") for r in data.records})
        return [f"# Eval on unseen tasks: {tasks} held-out seed tasks of {cfg.seeds} ({n:,} records)", "",
                "Held out from generate's and respond's examples and from mix; filter and generate dropped "
                "instructions close to them (`eval_overlap`), so the tuned model never trained on these tasks.", ""]
    return [f"# Eval on {cfg.predictions or cfg.data} ({n:,} records)", ""]
