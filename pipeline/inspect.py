"""Summarise any stage's JSONL: what it holds, how long, how diverse, how close to the seeds.

    python -m pipeline inspect data/alpaca_data.jsonl --html data/report.html --run runs/sft

Recognises which stage wrote the file from its records and prints counts, length statistics
per language (English words, Japanese characters: never averaged together), the share with an
empty input, the most common leading verbs (the diversity view of the Self-Instruct paper,
Figure 2; for Japanese the task verb in dictionary form, 書く, 換える, 要約する), the histogram of each
instruction's highest ROUGE-L to the seeds (Figure 3), rejects by reason when a
`<name>.rejected.jsonl` sits beside the file, and three random records. `--html` writes one
self-contained page with the same views as embedded PNG plots (Japanese drawn with the
IPAexGothic font that `japanize-matplotlib` ships, see `pipeline.plot_fonts`), the loss curve of
a run folder (`--run`), and a searchable table of records whose Japanese cells say `lang="ja"`.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import math
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import option, validate
from pipeline.errors import InputError, UserError
from pipeline.jsonl import (atomic_write, check_fields, check_output_path, claim_outputs, load_records, locked_outputs,
                            read_records, rejected_path_for)
from pipeline.ja_verbs import japanese_task_verb
from pipeline.lang import SPACELESS_LANGUAGES, language_of, text_length
from pipeline.plots import draw_histogram, draw_loss, histogram
from pipeline.seeds import INSTANCE_FIELDS

TOP_VERBS_SHOWN = 20
TEXT_PREVIEW_CHARS = 160  # per field in the terminal samples; the HTML table shows more
# Characters a terminal acts on instead of showing: C0/C1 controls (ESC starts colour, title and
# cursor sequences; BEL rings) and the bidirectional overrides that make text read backwards.
TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
TABLE_PREVIEW_CHARS = 600
LOWEST_SCORES_SHOWN = 5  # lowest-scored records (judge) printed with the judge's reason

# Words that open an instruction without being its task verb ("Please summarize ...").
LEADING_FILLER = {"please", "kindly", "now", "then", "also", "first", "briefly", "carefully", "quickly", "simply"}
QUESTION_WORDS = {"what", "who", "whom", "whose", "which", "when", "where", "why", "how", "is", "are", "do", "does",
                  "can", "could", "should", "would", "will", "did"}
LENGTH_UNITS = {lang: "characters" for lang in SPACELESS_LANGUAGES}  # everything else: words

# The two record shapes every stage writes: an instruction record (seed tasks add `instances`),
# or a chat conversation. Anything else would be summarised as empty text, silently.
INSTRUCTION_RECORD = {"instruction": (str, True, False), "input": (str, False, False), "output": (str, False, False),
                      "instances": (list, False, False)}
CHAT_RECORD = {"messages": (list, True, False)}


@dataclass(frozen=True)
class Config:
    file: str = option("data/alpaca_data.jsonl", "the JSONL file to inspect (any stage's output, or seeds)", positional=True)
    html: str | None = option(None, "also write a self-contained HTML report to this path")
    run: str | None = option(None, "a finetune run folder; its metrics.jsonl gives the loss curve in the report")
    seeds: str = option("seeds/seed_tasks.jsonl", "seed tasks, for the highest-ROUGE-L-to-seeds histogram")
    samples: int = option(3, "random records to print", min=0)
    table_rows: int = option(1000, "records in the report's searchable table", min=0)
    seed: int = option(0, "random seed for the sampled records")

    def __post_init__(self):
        validate(self)  # bounds from the field metadata


# --- what is in the file ---------------------------------------------------------------------

def detect_kind(records: list[dict]) -> str:
    """Which stage wrote these records, from the fields they carry."""
    first = records[0]
    if "instances" in first:
        return "seed tasks"
    if "messages" in first:
        return "chat training data (messages)"
    if "prediction" in first:
        return "eval predictions"
    if "reason" in first:
        return "rejected records"
    if "output" in first:
        return "training data (alpaca)"
    # `filter` adds its own keys; files it wrote before that carry max_rouge_l and most_similar
    # without generate's request_id.
    if "filter_max_rouge_l" in first or ("max_rouge_l" in first and "most_similar" in first and "request_id" not in first):
        return "filtered instructions"
    if "instruction" in first:
        return "generated instructions"
    return "unknown records"


def printable(text: str) -> str:
    """Generated text as a terminal should show it: controls written as escapes (`\x1b`), never obeyed."""
    return TERMINAL_CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def check_record(record: dict, path, line: int) -> None:
    """A chat record or an instruction record; a seed task's instances must each be an object of strings."""
    check_fields(record, CHAT_RECORD if "messages" in record else INSTRUCTION_RECORD, path, line)
    for i, instance in enumerate(record.get("instances") or []):
        try:
            check_fields(instance, INSTANCE_FIELDS, path, line)
        except InputError as e:
            raise InputError(path, line, f"instances[{i}].{e.field}" if e.field else f"instances[{i}]", e.problem) from None


def flatten(record: dict) -> dict:
    """instruction / input / output of any record shape, so one set of statistics fits all."""
    if "messages" in record:
        turns = [m for m in record["messages"] if isinstance(m, dict)]
        user = next((m.get("content", "") for m in turns if m.get("role") == "user"), "")
        assistant = next((m.get("content", "") for m in turns if m.get("role") == "assistant"), "")
        return {"instruction": str(user), "input": "", "output": str(assistant)}
    if "instances" in record:
        instance = (record.get("instances") or [{}])[0]
        return {"instruction": record.get("instruction", ""), "input": instance.get("input", ""),
                "output": instance.get("output", "")}
    return {key: str(record.get(key) or "") for key in ("instruction", "input", "output")}


def length_stats(texts: list[str]) -> dict | None:
    """count / mean / median / p90 / max of `text_length` (call it on one language's texts)."""
    lengths = sorted(text_length(t) for t in texts if t.strip())
    if not lengths:
        return None
    # p90 by nearest rank: the smallest length that at least 90% of the texts do not exceed.
    p90 = lengths[math.ceil(0.9 * len(lengths)) - 1]
    return {"count": len(lengths), "mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
            "p90": p90, "max": lengths[-1]}


def lengths_by_language(texts: list[str]) -> dict[str, dict]:
    """`length_stats` of each language's texts (words and characters are never averaged together)."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for text in texts:
        if text.strip():
            groups[language_of(text)].append(text)
    return {lang: length_stats(group) for lang, group in sorted(groups.items())}


def length_unit(language: str) -> str:
    return LENGTH_UNITS.get(language, "words")


def leading_verb(instruction: str) -> str:
    """The task verb an instruction opens with ("Summarize the text" -> "summarize").

    A heuristic rather than a parser: spaCy's English models are not on PyPI, and imperative
    instructions put their verb first, so skipping fillers gets the same top list the paper's
    Figure 2 shows. Questions are grouped as "(question)". Japanese puts the verb last: see
    `pipeline.ja_verbs.japanese_task_verb` (書いてください -> 書く).
    """
    text = instruction.strip()
    if language_of(text) == "ja":
        return japanese_task_verb(text)
    words = re.findall(r"[A-Za-z']+", text.lower())
    while words and words[0] in LEADING_FILLER:
        words.pop(0)
    if not words:
        return "(other)"
    if words[0] in QUESTION_WORDS or text.rstrip().endswith("?"):
        return "(question)"
    return words[0]


def max_rouge_to_seeds(instructions: list[str], seed_instructions: list[str]) -> list[float]:
    """Each instruction's highest ROUGE-L F1 to any seed, exact (the paper's Figure 3), by the filter's rule."""
    from pipeline.similarity import max_rouge_l

    return max_rouge_l(instructions, seed_instructions)


def rejected_reasons(path: Path) -> dict[str, int] | None:
    rejected = rejected_path_for(path)
    if not rejected.exists() or path.name.endswith(".rejected.jsonl"):
        return None
    counts = collections.Counter(r.get("reason", "(none)") for _, r in read_records(rejected))
    return dict(counts.most_common())


def judge_scores(records: list[dict]) -> dict | None:
    """The judge's scores (`judge` stage): histogram over the 1-5 steps, mean, and the lowest-scored records."""
    from pipeline.judging import SCORE_MAX, SCORE_MIN, record_score, score_bucket

    scored = [(record_score(r), i) for i, r in enumerate(records) if record_score(r) is not None]
    if not scored:
        return None
    buckets = collections.Counter(score_bucket(score) for score, _ in scored)
    lowest = sorted(scored)[:LOWEST_SCORES_SHOWN]
    return {"histogram": {str(b): buckets.get(b, 0) for b in range(SCORE_MIN, SCORE_MAX + 1)},
            "mean": round(statistics.fmean(score for score, _ in scored), 3), "scored": len(scored),
            "lowest": [{"index": i, "score": score, "reason": str(records[i]["judge"].get("reason") or ""),
                        "instruction": flatten(records[i])["instruction"]} for score, i in lowest]}


def summarize(records: list[dict], cfg: Config, seed_instructions: list[str]) -> dict:
    rows = [flatten(r) for r in records]
    instructions = [r["instruction"] for r in rows]
    languages = collections.Counter(language_of(i) for i in instructions)
    verbs = collections.Counter(leading_verb(i) for i in instructions if i.strip())
    is_seed_file = "instances" in records[0]
    similarities = [] if is_seed_file else max_rouge_to_seeds(instructions, seed_instructions)
    summary = {
        "file": str(cfg.file),
        "kind": detect_kind(records),
        "records": len(records),
        "languages": dict(languages.most_common()),
        "lengths": {field: lengths_by_language([r[field] for r in rows]) for field in ("instruction", "input", "output")},
        "empty_input_share": round(sum(not r["input"].strip() for r in rows) / len(rows), 3),
        "leading_verbs": verbs.most_common(TOP_VERBS_SHOWN),
        "distinct_leading_verbs": len(verbs),
        "max_rouge_l_to_seeds": similarities,
        "rejected": rejected_reasons(Path(cfg.file)),
    }
    summary["judge"] = judge_scores(records)
    if "is_classification" in records[0]:
        summary["classification_share"] = round(sum(bool(r.get("is_classification")) for r in records) / len(records), 3)
    return summary


# --- the terminal view -----------------------------------------------------------------------

def print_summary(summary: dict, records: list[dict], cfg: Config) -> None:
    print(f"{summary['file']}: {summary['records']:,} {summary['kind']}")
    print("languages: " + ", ".join(f"{lang} {n:,}" for lang, n in summary["languages"].items()))
    print("lengths per language (words; characters for Japanese and Chinese):")
    for field, by_language in summary["lengths"].items():
        for lang, stats in by_language.items():
            print(f"  {field:<12} {lang} {length_unit(lang):<10} n={stats['count']:<6,} mean {stats['mean']:<7} "
                  f"median {stats['median']:<6} p90 {stats['p90']:<6} max {stats['max']}")
    print(f"empty input: {summary['empty_input_share']:.1%}")
    if "classification_share" in summary:
        print(f"classification tasks: {summary['classification_share']:.1%}")
    verbs = ", ".join(f"{verb} {n}" for verb, n in summary["leading_verbs"][:10])
    print(f"leading verbs ({summary['distinct_leading_verbs']} distinct): {verbs}")
    if summary["max_rouge_l_to_seeds"]:
        print("highest ROUGE-L to a seed:")
        for low, high, count in histogram(summary["max_rouge_l_to_seeds"]):
            print(f"  {low:.1f}-{high:.1f} {'#' * min(count, 60)} {count}")
    if summary["rejected"]:
        print("rejected beside it: " + ", ".join(f"{reason} {n:,}" for reason, n in summary["rejected"].items()))
    if summary.get("judge"):
        print_judge_scores(summary["judge"])
    rng = random.Random(cfg.seed)
    for record in rng.sample(records, min(cfg.samples, len(records))):
        print("---")
        for field, value in flatten(record).items():
            if value:
                text = printable(value.replace("\n", " "))
                print(f"{field}: {text[:TEXT_PREVIEW_CHARS]}{'...' if len(text) > TEXT_PREVIEW_CHARS else ''}")


def print_judge_scores(scores: dict) -> None:
    top = max(scores["histogram"].values()) or 1
    print(f"judge scores ({scores['scored']:,} scored, mean {scores['mean']:.2f}; probability scores rounded):")
    for bucket, count in scores["histogram"].items():
        print(f"  {bucket} {'#' * round(60 * count / top)} {count}")
    print("lowest-scored records:")
    for low in scores["lowest"]:
        text = printable(f"{low['instruction']} -- {low['reason']}".replace("\n", " "))
        print(f"  {low['score']:.2f} #{low['index'] + 1}: {text[:TEXT_PREVIEW_CHARS]}")


# --- the HTML report -------------------------------------------------------------------------

def png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def make_plots(summary: dict, run: Path | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plot_fonts import use_japanese_font

    use_japanese_font()  # Japanese verbs and labels as glyphs, not empty boxes
    plots = {}
    if summary["max_rouge_l_to_seeds"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        draw_histogram(ax, summary["max_rouge_l_to_seeds"], color="#4c72b0")  # the bins the text summary prints
        ax.set_xlabel("highest ROUGE-L F1 to a seed task")
        ax.set_ylabel("instructions")
        ax.set_title("Similarity to the seeds (Self-Instruct, Fig. 3)")
        plots["similarity"] = png_data_uri(fig)
    if summary["leading_verbs"]:
        verbs = summary["leading_verbs"][::-1]
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(verbs) + 1))
        ax.barh([v for v, _ in verbs], [n for _, n in verbs], color="#55a868")
        ax.set_xlabel("instructions")
        ax.set_title("Most common leading verbs (Self-Instruct, Fig. 2)")
        plots["verbs"] = png_data_uri(fig)
    lengths = lengths_plot(summary["lengths"], plt)
    if lengths:
        plots["lengths"] = lengths
    if run is not None:
        loss = loss_curve_plot(run, plt)
        if loss:
            plots["loss"] = loss
    return plots


def lengths_plot(lengths: dict[str, dict[str, dict]], plt) -> str | None:
    """Mean and median length of each field per language, one panel per unit (words, characters),
    so a Japanese character count never shares an axis with an English word count."""
    by_unit: dict[str, list[tuple[str, dict]]] = collections.defaultdict(list)
    for field, by_language in lengths.items():
        for lang, stats in by_language.items():
            by_unit[length_unit(lang)].append((f"{field}\n({lang})", stats))
    if not by_unit:
        return None
    fig, axes = plt.subplots(1, len(by_unit), figsize=(3.2 * len(by_unit) + 1, 3), squeeze=False)
    for ax, (unit, bars) in zip(axes[0], sorted(by_unit.items(), reverse=True)):
        labels = [label for label, _ in bars]
        ax.bar(labels, [s["mean"] for _, s in bars], color="#c44e52", label="mean")
        ax.bar(labels, [s["median"] for _, s in bars], color="#dd8452", width=0.4, label="median")
        ax.set_ylabel(unit)
        ax.set_title(f"Lengths in {unit}")
        ax.legend()
    fig.tight_layout()
    return png_data_uri(fig)


def loss_curve_plot(run: Path, plt) -> str | None:
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if not draw_loss(ax, [r for _, r in read_records(metrics_path)]):
        plt.close(fig)
        return None
    ax.set_title(f"Loss: {run}")
    return png_data_uri(fig)


PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.88em} td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4} .stats td{white-space:nowrap} img{max-width:100%;border:1px solid #eee}
#search{width:100%;padding:6px;font-size:1em;margin:.5em 0} .muted{color:#777}
td.text{white-space:pre-wrap;max-width:420px}
"""

PAGE_SCRIPT = """
const box = document.getElementById('search');
const rows = Array.from(document.querySelectorAll('#records tbody tr'));
const shown = document.getElementById('shown');
// Clicking a numeric column's header sorts the table by it (again: the other way round).
for (const th of document.querySelectorAll('#records th[data-sort]')) {
  th.style.cursor = 'pointer';
  th.addEventListener('click', () => {
    const col = th.cellIndex, dir = th.dataset.dir === 'asc' ? -1 : 1;
    th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    const value = r => { const v = parseFloat(r.cells[col].textContent); return isNaN(v) ? Infinity : v; };
    rows.sort((a, b) => dir * (value(a) - value(b)));
    const body = document.querySelector('#records tbody');
    for (const r of rows) body.appendChild(r);
  });
}
box.addEventListener('input', () => {
  const q = box.value.toLowerCase();
  let n = 0;
  for (const row of rows) { const hit = row.textContent.toLowerCase().includes(q); row.style.display = hit ? '' : 'none'; n += hit; }
  shown.textContent = n;
});
"""


def lang_attribute(text: str) -> str:
    """` lang="ja"` (or zh, ko) for a cell in another language than the page's English, so a
    browser and a screen reader pick Japanese glyphs and reading; empty for English."""
    language = language_of(text) if text.strip() else "en"
    return "" if language == "en" else f' lang="{language}"'


def render_html(summary: dict, records: list[dict], plots: dict[str, str], cfg: Config) -> str:
    from pipeline.judging import record_score

    e = html.escape
    stats_rows = "".join(
        f"<tr><td>{e(field)}</td><td>{e(lang)}</td><td>{length_unit(lang)}</td><td>{s['count']:,}</td><td>{s['mean']}</td>"
        f"<td>{s['median']}</td><td>{s['p90']}</td><td>{s['max']}</td></tr>"
        for field, by_language in summary["lengths"].items() for lang, s in by_language.items())
    facts = [("kind", summary["kind"]), ("records", f"{summary['records']:,}"),
             ("languages", ", ".join(f"{k} {v:,}" for k, v in summary["languages"].items())),
             ("empty input", f"{summary['empty_input_share']:.1%}"),
             ("distinct leading verbs", str(summary["distinct_leading_verbs"]))]
    if "classification_share" in summary:
        facts.append(("classification tasks", f"{summary['classification_share']:.1%}"))
    if summary["rejected"]:
        facts.append(("rejected beside it", ", ".join(f"{k} {v:,}" for k, v in summary["rejected"].items())))
    if summary.get("judge"):
        judged = summary["judge"]
        facts.append(("judge scores", f"mean {judged['mean']:.2f}; " + ", ".join(f"{b}: {n:,}" for b, n in judged["histogram"].items())))
    facts_html = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    titles = {"similarity": "Similarity to the seeds", "verbs": "Leading verbs", "lengths": "Lengths", "loss": "Loss curve"}
    plots_html = "".join(f'<h2>{titles[name]}</h2><img class="plot" alt="{titles[name]}" src="{uri}">'
                         for name, uri in plots.items())
    shown = records[: cfg.table_rows]
    similarities = summary["max_rouge_l_to_seeds"]
    table_rows = []
    for i, record in enumerate(shown):
        row = flatten(record)
        cells = "".join(f'<td class="text"{lang_attribute(row[f])}>{e(row[f][:TABLE_PREVIEW_CHARS])}</td>'
                        for f in ("instruction", "input", "output"))
        score = f"{similarities[i]:.2f}" if similarities else ""
        judged = record_score(record)
        reason = e(str(record["judge"].get("reason") or "")) if judged is not None else ""  # shown on hover
        judged_text = "" if judged is None else f"{judged:g}"
        table_rows.append(f'<tr><td>{i + 1}</td>{cells}<td>{score}</td><td title="{reason}">{judged_text}</td></tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset report: {e(Path(cfg.file).name)}</title>
<style>{PAGE_STYLE}</style></head><body>
<h1>Dataset report: {e(str(cfg.file))}</h1>
<table class="stats">{facts_html}</table>
<h2>Lengths <span class="muted">(per language: words; characters for Japanese and Chinese)</span></h2>
<table class="stats"><tr><th>field</th><th>language</th><th>unit</th><th>non-empty</th><th>mean</th><th>median</th><th>p90</th><th>max</th></tr>{stats_rows}</table>
{plots_html}
<h2>Records <span class="muted">(<span id="shown">{len(shown):,}</span> of {len(records):,} shown)</span></h2>
<input id="search" type="search" placeholder="search instructions, inputs and outputs">
<table id="records"><thead><tr><th>#</th><th>instruction</th><th>input</th><th>output</th><th data-sort>ROUGE-L to seeds</th><th data-sort>judge score</th></tr></thead>
<tbody>{''.join(table_rows)}</tbody></table>
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


@locked_outputs
def run(cfg: Config) -> dict:
    path = Path(cfg.file)
    records = load_records(path, validate=lambda record, line: check_record(record, path, line))
    if cfg.html:
        check_output_path(cfg.html, "--html")
        claim_outputs({"FILE": [path, rejected_path_for(path)], "--seeds": cfg.seeds}, {"--html": cfg.html})
    run_dir = Path(cfg.run) if cfg.run else None
    if run_dir is not None and not run_dir.is_dir():
        raise UserError(f"--run {cfg.run}: no such folder")
    seed_instructions = []
    if "instances" not in records[0] and Path(cfg.seeds).exists():
        from pipeline.seeds import load_seeds

        seed_instructions = [s.instruction for s in load_seeds(cfg.seeds)]
    summary = summarize(records, cfg, seed_instructions)
    print_summary(summary, records, cfg)
    if cfg.html:
        page = render_html(summary, records, make_plots(summary, run_dir), cfg)
        with atomic_write(cfg.html) as f:
            f.write(page)
        print(f"report: {cfg.html}")
    return summary

