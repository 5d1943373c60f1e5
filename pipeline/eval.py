"""Loss, token accuracy, exact match, BLEU and ROUGE-L of a model on held-out data, beside a baseline.

    python -m pipeline eval --model runs/sft --baseline SmolLM2-135M-Instruct --data runs/sft/val.jsonl
    python -m pipeline eval --data seeds            # the seed tasks' human-written instances
    python -m pipeline eval --predictions answers.jsonl --out answers.eval.json   # no model

Each model is scored twice on the same records and the same prompts: the template the tuned
model was trained with (`--template`, default: the one in `<model>/train_config.json`, else
alpaca), so the baseline shows what the model did with those prompts before fine-tuning:

- teacher-forced, batched: mean cross-entropy over the response tokens (token-weighted, as
  in training), perplexity = exp(loss), and token accuracy (argmax equals the label, response
  tokens only). Records whose response does not fit in `--max-length` at all are counted as
  dropped and left out of these three.
- generated: greedy decoding, batched with left padding, cut at EOS, then exact match (after
  trimming and collapsing whitespace), sacrebleu corpus BLEU and mean ROUGE-L F1 against the
  reference `output` (see `pipeline.metrics` for how BLEU treats English, Japanese and a mix).

`--predictions FILE` scores records that already carry `output` and `prediction` (and, when
every record has it, `baseline_prediction`), so an API model's answers can be scored too;
the teacher-forced measures do not apply there and are absent from the output, never 0.

Writes `eval.json` (`--out`): `{"metrics", "baseline", "config", "counts"}`, fractions from 0
to 1 except BLEU (0-100); `eval.md` beside it (metric | base | tuned | delta, also printed);
`eval_predictions.jsonl` with every record's predictions and scores; `eval.config.json`.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import metrics as M
from pipeline.config import option, to_dict, write_resolved_config
from pipeline.errors import InputError, UserError
from pipeline.jsonl import atomic_write, check_fields, check_output_path, load_records, write_json_atomic, write_jsonl_atomic
from pipeline.lang import language_of
from pipeline.seeds import DEFAULT_SEEDS, instance_records, load_seeds

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
TRAIN_CONFIG = "train_config.json"  # written by `finetune` into its output folder

METRIC_ORDER = ("loss", "perplexity", "token_accuracy", "exact_match", "bleu", "rouge_l")
LOWER_IS_BETTER = {"loss", "perplexity"}

DATA_FIELDS = {
    "instruction": (str, True, True),
    "input": (str, False, False),
    "output": (str, True, False),
}
MESSAGE_FIELDS = {"role": (str, True, True), "content": (str, True, False)}
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
    data: str = option("runs/sft/val.jsonl", f"held-out records (JSONL with instruction/input/output), or `{SEEDS_DATA}` for the seed tasks' human-written instances")
    baseline: str | None = option(None, "a second model scored the same way for comparison, e.g. the model before fine-tuning")
    out: str = option("runs/sft/eval.json", "where eval.json goes; eval.md and eval_predictions.jsonl go beside it")
    predictions: str | None = option(None, "score a JSONL whose records carry `output` and `prediction` (optionally `baseline_prediction`); no model is loaded")
    template: Literal["alpaca", "chat"] | None = option(None, f"prompt template (default: the one in <model>/{TRAIN_CONFIG}, else {DEFAULT_TEMPLATE})")
    max_length: int | None = option(None, f"token limit of prompt + response for the teacher-forced measures (default: <model>/{TRAIN_CONFIG}'s, else {DEFAULT_MAX_LENGTH})")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "most tokens generated per answer")
    batch_size: int = option(DEFAULT_BATCH_SIZE, "records per forward pass and per generate call")
    limit: int | None = option(None, "evaluate only the first N records")
    seeds: str = option(DEFAULT_SEEDS, f"the seed file `--data {SEEDS_DATA}` reads")
    device: str = option("auto", "cuda, mps, cpu, or auto")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "weights' precision (auto: bf16 on a GPU that has it, else fp32)")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit: must be at least 1, got {self.limit}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max-length: must be at least 2, got {self.max_length}")
        if self.predictions is not None and self.baseline is not None:
            raise UserError("--baseline: not used with --predictions (put `baseline_prediction` in the records instead)")


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
    record_loss: list[float | None]
    counts: dict


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
    else:
        records = load_records(cfg.data, validate=_data_validator(cfg.data))
    if cfg.limit is not None:
        records = records[: cfg.limit]
    return records


def _data_validator(path):
    """An Alpaca record with `output`, or a `messages` conversation that ends with the assistant's turn."""
    def validate(record: dict, line: int) -> None:
        if "messages" not in record:
            check_fields(record, DATA_FIELDS, path, line)
            return
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(path, line, "messages", "expected a non-empty list of {role, content} turns")
        for i, message in enumerate(messages):
            try:
                check_fields(message, MESSAGE_FIELDS, path, line)
            except InputError as e:
                raise InputError(path, line, f"messages[{i}].{e.field}" if e.field else f"messages[{i}]", e.problem) from None
        if messages[-1]["role"] != "assistant":
            raise InputError(path, line, "messages", "the last turn must be the assistant's (it is the reference answer)")
    return validate


def reference_of(record: dict) -> str:
    """The answer a prediction is scored against: `output`, or the last assistant turn."""
    return record["output"] if "output" in record else record["messages"][-1]["content"]


def train_settings(model_dir: Path) -> dict:
    """template and max_length recorded by `finetune` in the model folder (empty when absent)."""
    path = model_dir / TRAIN_CONFIG
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    nested = data.get("config") if isinstance(data.get("config"), dict) else {}
    return {key: data.get(key, nested.get(key)) for key in ("template", "max_length")
            if data.get(key, nested.get(key)) is not None}


def run(cfg: Config, *, client=None) -> Stats:
    started = time.perf_counter()
    out, md_path, predictions_path = output_paths(cfg.out)
    for path in (out, md_path, predictions_path):
        check_output_path(path, "--out")
    records = load_eval_records(cfg)
    references = [reference_of(r) for r in records]
    languages = [language_of(ref) for ref in references]
    counts: dict = {"records": len(records), "languages": {lang: languages.count(lang) for lang in sorted(set(languages))}}
    resolved: dict = {}

    if cfg.predictions is not None:
        tuned, base, names = score_predictions(records, references, languages, cfg)
    else:
        tuned, base, names, resolved = score_models(records, references, languages, cfg)
        counts["tuned"] = tuned.counts
        if base is not None:
            counts["baseline"] = base.counts

    result = {"metrics": tuned.metrics}
    if base is not None:
        result["baseline"] = base.metrics
    result["config"] = {**to_dict(cfg), **resolved, "bleu_tokenize": {lang: M.bleu_tokenize_for(lang) for lang in sorted(set(languages))}}
    result["counts"] = counts
    seconds = time.perf_counter() - started
    result["seconds"] = round(seconds, 2)

    table = markdown_report(tuned.metrics, base.metrics if base else None, names, cfg, len(records))
    write_jsonl_atomic(predictions_path, prediction_rows(records, languages, tuned, base))
    write_json_atomic(out, result)
    with atomic_write(md_path) as f:
        f.write(table)
    write_resolved_config(cfg, out, {"resolved": resolved})
    print(table)
    for label in ("tuned", "baseline"):
        if label in counts:
            c = counts[label]
            print(f"{label}: {c['scored_records']:,} records teacher-forced ({c['dropped']} dropped, {c['truncated']} truncated, "
                  f"{c['response_tokens']:,} response tokens); {c['generated_tokens']:,} tokens generated, "
                  f"{c['hit_max_new_tokens']} answers hit --max-new-tokens, {c['empty_predictions']} empty; {c['seconds']:.1f} s")
    print(f"{len(records):,} records ({', '.join(f'{n} {lang}' for lang, n in counts['languages'].items())}) in {seconds:.1f} s; "
          f"wrote {out}, {md_path}, {predictions_path}")
    return Stats(tuned.metrics, base.metrics if base else None, counts, out, seconds, [out, md_path, predictions_path])


def score_predictions(records: list[dict], references: list[str], languages: list[str],
                      cfg: Config) -> tuple[ModelScores, ModelScores | None, dict]:
    """`--predictions`: the answers are in the records; `baseline_prediction` too when every record has one."""
    none = [None] * len(records)
    preds = [r["prediction"] for r in records]
    tuned = ModelScores(M.generation_metrics(preds, references, languages), preds, none, {})
    base = None
    if all("baseline_prediction" in r for r in records):
        preds = [r["baseline_prediction"] for r in records]
        base = ModelScores(M.generation_metrics(preds, references, languages), preds, none, {})
    return tuned, base, {"tuned": cfg.predictions, "base": "baseline_prediction" if base else None}


def score_models(records: list[dict], references: list[str], languages: list[str],
                 cfg: Config) -> tuple[ModelScores, ModelScores | None, dict, dict]:
    """Both models on the records, with the template and length the tuned one was trained with."""
    from pipeline.models import load_tokenizer, resolve_model
    from pipeline.templates import prompt_ids

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
    tuned = score_model(cfg.model, records, references, languages, cfg, resolved, "tuned")
    base = None
    if cfg.baseline is not None:
        base = score_model(cfg.baseline, records, references, languages, cfg, resolved, "base")
    return tuned, base, {"tuned": cfg.model, "base": cfg.baseline}, resolved


def score_model(name: str, records: list[dict], references: list[str], languages: list[str],
                cfg: Config, resolved: dict, label: str) -> ModelScores:
    """Load one model, run both kinds of measure on `records`, and free it again."""
    from pipeline.models import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(name)
    model = load_model(name, device=cfg.device, dtype=cfg.dtype)
    try:
        sums, record_loss, tf_counts = teacher_forced(model, tokenizer, records, resolved["template"],
                                                      resolved["max_length"], cfg.batch_size, label)
        predictions, gen_counts = generate_answers(model, tokenizer, records, resolved["template"],
                                                   cfg.max_new_tokens, cfg.batch_size, label)
    finally:
        del model
        gc.collect()
        _empty_device_cache()
    metrics = {**M.teacher_forced_metrics(*sums), **M.generation_metrics(predictions, references, languages)}
    seconds = round(time.perf_counter() - started, 2)
    return ModelScores(metrics, predictions, record_loss, {**tf_counts, **gen_counts, "seconds": seconds})


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def teacher_forced(model, tokenizer, records: list[dict], template: str, max_length: int,
                   batch_size: int, label: str) -> tuple[tuple[float, int, int], list[float | None], dict]:
    """Summed response cross-entropy, argmax hits and token count over `records`, plus each
    record's mean loss (None when its response was cut away entirely)."""
    import torch
    from tqdm import tqdm

    from pipeline.templates import encode_example

    encoded = [encode_example(r, tokenizer, template, max_length) for r in records]
    kept = [i for i, e in enumerate(encoded) if e.num_trained_tokens > 0]
    # Similar lengths in one batch: little padding, and the longest batch runs first so an
    # out-of-memory error comes at once rather than at the end.
    kept.sort(key=lambda i: -len(encoded[i].input_ids))
    pad_id = tokenizer.pad_token_id
    device = model.device
    record_loss: list[float | None] = [None] * len(records)
    loss_sum, correct, tokens = 0.0, 0, 0
    with torch.inference_mode(), tqdm(total=len(kept), desc=f"{label}: teacher-forced", unit="rec") as bar:
        for start in range(0, len(kept), batch_size):
            batch = kept[start: start + batch_size]
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
                record_loss[i] = sums.loss[row] / sums.tokens[row]
            loss_sum += sum(sums.loss)
            correct += sum(sums.correct)
            tokens += sum(sums.tokens)
            bar.update(len(batch))
    counts = {"scored_records": len(kept), "response_tokens": tokens,
              "truncated": sum(e.truncated for e in encoded), "dropped": len(records) - len(kept)}
    return (loss_sum, correct, tokens), record_loss, counts


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS (what training appended) and the model's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def generate_answers(model, tokenizer, records: list[dict], template: str, max_new_tokens: int,
                     batch_size: int, label: str) -> tuple[list[str], dict]:
    """Greedy answers to each record's prompt, cut at the first EOS."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    from pipeline.templates import prompt_ids

    # The very ids training put before each response (not a re-tokenized string), so the
    # model continues the sequence it learnt to continue.
    prompts = [prompt_ids(r, template, tokenizer) for r in records]
    eos_ids = eos_token_ids(model, tokenizer)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position of each row
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    generated_tokens = hit_limit = 0
    with torch.inference_mode(), tqdm(total=len(prompts), desc=f"{label}: generate", unit="rec") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            enc = tokenizer.pad({"input_ids": [prompts[i] for i in batch]}, padding=True,
                                return_tensors="pt").to(model.device)
            out = model.generate(**enc, generation_config=generation)
            new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            for row, i in enumerate(batch):
                ids = new_tokens[row]
                end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                if end is None:
                    hit_limit += 1
                    end = len(ids)
                generated_tokens += end
                answers[i] = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
            bar.update(len(batch))
    counts = {"generated_tokens": generated_tokens, "hit_max_new_tokens": hit_limit,
              "empty_predictions": sum(not a for a in answers)}
    return answers, counts


def prediction_rows(records: list[dict], languages: list[str], tuned: ModelScores,
                    base: ModelScores | None) -> list[dict]:
    """One readable line per record: the reference, each model's answer, and its scores."""
    rows = []
    for i, (record, lang) in enumerate(zip(records, languages)):
        row = {key: record[key] for key in ("id", "instruction", "input") if key in record}
        if "messages" in record:
            row["messages"] = record["messages"][:-1]
        row.update(output=reference_of(record), language=lang)
        for prefix, scores in (("", tuned), ("baseline_", base)):
            if scores is None:
                continue
            prediction = scores.predictions[i]
            row[f"{prefix}prediction"] = prediction
            row[f"{prefix}exact_match"] = M.exact_match(prediction, row["output"])
            row[f"{prefix}rouge_l"] = round(M.rouge_l_f1(prediction, row["output"]), 4)
            if scores.record_loss[i] is not None:
                row[f"{prefix}loss"] = round(scores.record_loss[i], 4)
        rows.append(row)
    return rows


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    if metric.startswith("bleu") or metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.4f}"


def markdown_report(tuned: dict, base: dict | None, names: dict, cfg: Config, n_records: int) -> str:
    """The table metric | base | tuned | delta, with what was compared above it."""
    data = cfg.predictions or cfg.data
    lines = [f"# Eval on {data} ({n_records:,} records)", "",
             f"base: {names['base'] or '(none)'}  ", f"tuned: {names['tuned']}", "",
             "| metric | base | tuned | delta |", "| --- | ---: | ---: | ---: |"]
    keys = [k for k in METRIC_ORDER if k in tuned or (base and k in base)]
    keys += sorted(k for k in {*tuned, *(base or {})} if k not in METRIC_ORDER)
    for key in keys:
        b = base.get(key) if base else None
        t = tuned.get(key)
        delta = "—" if b is None or t is None else ("+" if t - b >= 0 else "") + _format(key, t - b)
        name = f"{key} (lower is better)" if key in LOWER_IS_BETTER else key
        lines.append(f"| {name} | {_format(key, b)} | {_format(key, t)} | {delta} |")
    lines.append("")
    lines.append("token_accuracy, exact_match, rouge_l: fractions 0-1; bleu: sacrebleu 0-100.")
    return "\n".join(lines) + "\n"
