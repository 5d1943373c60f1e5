"""Model cards and dataset cards: what a run leaves so that another person can use and judge it.

- `write_model_card(output_dir, ...)`: `finetune` (and `dpo`) write `README.md` in the model
  folder in the Hugging Face model-card format (`huggingface_hub.ModelCard`): YAML front matter
  (`base_model`, `library_name: transformers`, the base's `license` when it is known, `datasets`,
  `tags`) and a body with the training data (files, counts by source and language, a SHA-256),
  the hyperparameters, library versions and git commit, and the limits of a model trained on a
  small model's data. The evaluation section says "not evaluated yet" (a new model has not been,
  even when an earlier run's eval.md is still in the folder) until `eval --model <folder>` puts its
  eval.md table there (`refresh_model_card_eval`).
- `write_dataset_card(output, ...)`: `respond` and `mix` describe the file they wrote. Several
  outputs share one folder (`data/`), and that folder's README.md may be the repository's own,
  so each output gets `<stem>.card.md` beside it, and the folder gets `.huggingface.yaml`, whose
  `configs` block (`datasets` reads it beside a local folder's README.md) names every data file
  carded there: `load_dataset("data", "alpaca_data")` loads the file, and `load_dataset("data")`
  the last one written. The folder's README.md is (re)written as the combined dataset card only
  when there is none or it is one written here (`GENERATED_MARK`): a committed README.md stays.

Both are written atomically; `.huggingface.yaml` is updated under a lock, so two stages finishing
in one folder at once both stay listed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
from pathlib import Path
from typing import Iterable

from pipeline.jsonl import atomic_write, config_path_for, is_special, path_beside, read_records
from pipeline.lang import language_of
from pipeline.provenance import provenance

GENERATED_MARK = "<!-- written by self-instruct-pipeline (pipeline/cards.py); rerunning a stage rewrites it -->"
CARD_FILE = "README.md"
DATASET_YAML = ".huggingface.yaml"  # `datasets`' standalone metadata file beside a local folder's card
CARD_LOCK = ".cards.lock"
EVAL_START, EVAL_END = "<!-- eval:start -->", "<!-- eval:end -->"
NO_EVAL = "Not evaluated yet: `python -m pipeline eval --model <this folder>` fills this section in."
LIMITS = """\
- The training data was written by a small language model (instructions and answers alike) and
  filtered by heuristics and ROUGE-L similarity, not by people: answers can be wrong, shallow or
  inconsistent, and the model learns those errors along with the format.
- The data covers what the seed tasks and the generating model suggested: narrow in topics, skewed
  towards the seeds' languages, and not checked for bias, safety or facts.
- It is a research artefact for studying instruction tuning, not a model to rely on for advice."""
HOSTED_NOTE = ("Records written by a hosted model ({}) carry that provider's terms of use, which may restrict "
               "using them to train other models; read them before sharing or training on this data.")
LOCAL_BACKENDS = {"local", "fake"}


# ----------------------------------------------------------------------------- what the records hold


def record_language(record: dict) -> str:
    if isinstance(record.get("language"), str):
        return record["language"]
    origin = record.get("instruction_provenance")
    if isinstance(origin, dict) and isinstance(origin.get("language"), str):
        return origin["language"]
    if isinstance(record.get("messages"), list):
        users = [m.get("content", "") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return language_of(str(users[0]) if users else "")
    return language_of(str(record.get("instruction") or record.get("prompt") or ""))


def record_source(record: dict) -> str:
    for key in ("source", "mix_source"):
        if isinstance(record.get(key), str) and record[key]:
            return record[key]
    return "self-instruct" if "instruction_provenance" in record or "backend" in record else "unlabelled"


def record_kind(record: dict) -> str:
    if "messages" in record:
        return "conversation"
    if "chosen" in record and "rejected" in record:
        return "preference pair"
    return "classification" if record.get("is_classification") is True else "generation"


def writers(records: Iterable[dict]) -> collections.Counter:
    """(backend, model) -> records it wrote an instruction or an answer of."""
    counts: collections.Counter = collections.Counter()
    for record in records:
        seen = set()
        for holder in (record, record.get("instruction_provenance"), record.get("judge")):
            if isinstance(holder, dict) and holder.get("model"):
                seen.add((str(holder.get("backend") or "?"), str(holder["model"])))
        counts.update(seen)
    return counts


def summarize(records: list[dict]) -> dict:
    scores = [r["judge"]["score"] for r in records
              if isinstance(r.get("judge"), dict) and isinstance(r["judge"].get("score"), (int, float))]
    return {"records": len(records),
            "sources": collections.Counter(map(record_source, records)),
            "languages": collections.Counter(map(record_language, records)),
            "kinds": collections.Counter(map(record_kind, records)),
            "writers": writers(records),
            "judge_scores": collections.Counter(scores)}


def count_table(title: str, counts: collections.Counter) -> str:
    rows = "\n".join(f"| {name} | {n:,} |" for name, n in counts.most_common())
    return f"| {title} | records |\n| --- | ---: |\n{rows}\n"


def hosted_writers(counts: collections.Counter) -> list[str]:
    return sorted({f"{backend}: {model}" for backend, model in counts if backend not in LOCAL_BACKENDS})


def provenance_section() -> str:
    info = provenance()
    libraries = ", ".join(f"{name} {version}" for name, version in info["libraries"].items())
    return (f"- command: `{info['command']}`\n- git commit: {info['git_commit'] or 'unknown (no git)'}\n"
            f"- Python {info['python']}; {libraries}\n")


def data_section(files: dict[str, str], summary: dict) -> str:
    """Files with their SHA-256, then counts by source, language and kind."""
    listing = "\n".join(f"- `{name}` (sha256 `{digest}`)" for name, digest in files.items())
    return "\n".join([listing, "", f"{summary['records']:,} records.", "",
                      count_table("source", summary["sources"]), count_table("language", summary["languages"]),
                      count_table("kind", summary["kinds"])])


def digest(path) -> str:
    from pipeline.training import file_digest

    return file_digest(path)


# ----------------------------------------------------------------------------- model cards


def base_model_license(model_path: Path | None) -> str | None:
    """The base model's license from its own card's front matter, when its folder has one."""
    from huggingface_hub import ModelCard

    card = Path(model_path) / CARD_FILE if model_path is not None else None
    if card is None or not card.is_file():
        return None
    try:
        license_name = ModelCard.load(card).data.license
    except Exception:  # a README that is not a card (no front matter, bad YAML): no license claimed
        return None
    return license_name if isinstance(license_name, str) else None


def base_model_info(model: str) -> tuple[str, str | None]:
    """(`base_model` as the hub names it, its license or None) for `--model`: the embedded model's
    hub id and license, a hub id's or a local folder's own card."""
    from pipeline.models import EMBEDDED_HUB_ID, EMBEDDED_LICENSE, is_embedded, portable_name, resolve_model

    if is_embedded(model):
        return EMBEDDED_HUB_ID, EMBEDDED_LICENSE
    return portable_name(model), base_model_license(resolve_model(model))


def write_model_card(output_dir, *, stage: str, model: str, data_files: list[str], records: list[dict],
                     hyperparameters: dict, tags: Iterable[str] = ()) -> Path:
    """`<output_dir>/README.md`, a Hugging Face model card (see the module docstring) for a model
    tuned from `model` (`--model`) on `data_files` holding `records`; its path. `dpo` calls it too."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    base_model, license_name = base_model_info(model)
    summary = summarize(records)
    data = ModelCardData(base_model=base_model, library_name="transformers", license=license_name,
                         datasets=[Path(f).name for f in data_files], language=sorted(summary["languages"]),
                         tags=["self-instruct", stage, "generated-data", *tags], pipeline_tag="text-generation")
    # A `|` inside a cell would end it: escaped, as the Markdown table syntax allows.
    params = "\n".join(f"| `{k}` | `{str(v).replace('|', chr(92) + '|')}` |" for k, v in hyperparameters.items())
    body = "\n".join([
        GENERATED_MARK, "", f"# {output_dir.name}", "",
        f"`{base_model}` tuned by the `{stage}` stage of self-instruct-pipeline on instruction data the pipeline "
        "generated.", "",
        "## Training data", "", data_section({f: digest(f) for f in data_files}, summary), "",
        "## Hyperparameters", "", "| option | value |\n| --- | --- |", params, "",
        "## Evaluation", "", EVAL_START, NO_EVAL, EVAL_END, "",
        "## Limitations", "", LIMITS, "",
        "## Reproducing", "", provenance_section()])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = output_dir / CARD_FILE
    with atomic_write(path) as f:
        f.write(str(card))
    return path


def refresh_model_card_eval(model_dir, eval_markdown: str) -> bool:
    """Put `eval_markdown` into the evaluation section of a card written here; False (untouched) otherwise."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if GENERATED_MARK not in text or EVAL_START not in text or EVAL_END not in text:
        return False
    head, rest = text.split(EVAL_START, 1)
    _, tail = rest.split(EVAL_END, 1)
    with atomic_write(path) as f:
        f.write(f"{head}{EVAL_START}\n{eval_markdown.strip()}\n{EVAL_END}{tail}")
    return True


# ----------------------------------------------------------------------------- dataset cards


@contextlib.contextmanager
def _folder_lock(folder: Path):
    with open(folder / CARD_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dataset_config_name(output: Path) -> str:
    return output.name.rsplit(".", 1)[0]


def update_dataset_configs(output: Path) -> list[dict]:
    """Add `output` to its folder's `.huggingface.yaml` `configs` (as the default); the whole list."""
    import yaml

    path = output.parent / DATASET_YAML
    try:
        existing = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except yaml.YAMLError:
        existing = {}  # ours, damaged: rebuilt from this output on
    existing = existing if isinstance(existing, dict) else {}
    name = dataset_config_name(output)
    configs = [c for c in existing.get("configs") or [] if isinstance(c, dict) and c.get("config_name") != name
               and (output.parent / str((c.get("data_files") or [{}])[0].get("path", ""))).is_file()]
    for config in configs:
        config.pop("default", None)
    configs.append({"config_name": name, "data_files": [{"split": "train", "path": output.name}], "default": True})
    with atomic_write(path) as f:
        f.write(yaml.safe_dump({**existing, "configs": configs}, sort_keys=False, allow_unicode=True))
    return configs


def dataset_card_section(output: Path, *, stage: str, records: list[dict], inputs: dict[str, str],
                         settings: dict, rejects: dict | None) -> str:
    summary = summarize(records)
    files = {str(p): digest(p) for p in inputs.values() if p and Path(p).is_file()}
    hosted = hosted_writers(summary["writers"])
    parts = [f"## {output.name}", "", f"Written by `{stage}`; `load_dataset(\"{output.parent}\", "
             f"\"{dataset_config_name(output)}\")` loads it.", "",
             "### Inputs", "", *(f"- `{flag}`: `{p}`" + (f" (sha256 `{files[str(p)]}`)" if str(p) in files else "")
                                 for flag, p in inputs.items() if p), "",
             "### Contents", "", data_section({str(output): digest(output)}, summary),
             count_table("written by (backend, model)", collections.Counter(
                 {f"{b}: {m}": n for (b, m), n in summary["writers"].items()})) if summary["writers"] else ""]
    if summary["judge_scores"]:
        parts += ["### Judge scores", "", count_table("score", summary["judge_scores"])]
    if settings:
        parts += ["### Settings", "", *(f"- {name}: `{value}`" for name, value in settings.items()), ""]
    if rejects:
        parts += ["### Rejected", "", count_table("reason", collections.Counter(rejects))]
    if hosted:
        parts += ["### Terms", "", HOSTED_NOTE.format(", ".join(hosted)), ""]
    parts += ["### Reproducing", "", provenance_section()]
    return "\n".join(parts)


def filter_settings(filtered) -> tuple[dict, dict]:
    """The filter threshold and filter's rejects by reason, from the config and report beside a file
    `filter` wrote (`respond --in`); nothing when another stage (or a person) wrote it."""
    try:
        data = json.loads(config_path_for(filtered).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}, {}
    if not isinstance(data, dict) or data.get("stage") != "filter" or not isinstance(data.get("config"), dict):
        return {}, {}
    config = data["config"]
    settings = {"filter threshold (ROUGE-L)": config.get("threshold"), "filter tokenizer": config.get("tokenizer")}
    report = Path(config.get("report") or path_beside(filtered, "report.json"))
    try:
        rejects = json.loads(report.read_text(encoding="utf-8")).get("rejected_by_reason") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        rejects = {}
    return settings, {f"filter: {reason}": n for reason, n in rejects.items()}


def rejects_by_reason(rejected_file, stage: str) -> dict[str, int]:
    """`<stage>: <reason>` -> records in a stage's `.rejected.jsonl`."""
    if not Path(rejected_file).is_file():
        return {}
    counts = collections.Counter(str(r.get("reason", "?")) for _, r in read_records(rejected_file))
    return {f"{stage}: {reason}": n for reason, n in counts.most_common()}


def write_dataset_card(output, *, stage: str, records: list[dict] | None, inputs: dict[str, str], settings: dict | None = None,
                       rejects: dict | None = None) -> Path | None:
    """`<stem>.card.md` beside `output`, the folder's `configs`, and the folder's README.md when it is ours.
    Nothing for a device output (`--out /dev/null`) or one without records."""
    output = Path(output)
    if is_special(output) or not output.is_file():
        return None
    if records is None:  # an appended output: the whole file, earlier runs' records too
        records = [r for _, r in read_records(output)]
    if not records:
        return None  # a run that wrote nothing (its empty file is removed): nothing to describe or load
    card_path = path_beside(output, "card.md")
    section = dataset_card_section(output, stage=stage, records=records, inputs=inputs, settings=settings or {},
                                   rejects=rejects)
    with atomic_write(card_path) as f:
        f.write(section)
    with _folder_lock(output.parent):
        configs = update_dataset_configs(output)
        write_folder_card(output.parent, configs)
    return card_path


def write_folder_card(folder: Path, configs: list[dict]) -> None:
    """The folder's README.md as one dataset card (front matter with the configs, each output's section)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    readme = folder / CARD_FILE
    if readme.exists() and GENERATED_MARK not in readme.read_text(encoding="utf-8", errors="replace"):
        return  # someone's own README (the repository's data/README.md): `.huggingface.yaml` carries the configs
    sections = []
    for config in configs:
        card = path_beside(folder / config["data_files"][0]["path"], "card.md")
        if card.is_file():
            sections.append(card.read_text(encoding="utf-8"))
    data = DatasetCardData(configs=configs, tags=["self-instruct", "synthetic"],
                           task_categories=["text-generation"])
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{GENERATED_MARK}\n\n# {folder.resolve().name}\n\n"
                       + "\n\n".join(sections))
    with atomic_write(readme) as f:
        f.write(str(card))
