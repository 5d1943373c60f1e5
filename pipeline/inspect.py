"""Summarise any stage's JSONL: what it holds, how long, how diverse, how close to the seeds.

    python -m pipeline inspect data/alpaca_data.jsonl --html data/report.html --run runs/sft

Recognises which stage wrote the file from its records and prints counts, length statistics
(words, or characters for Japanese), the share with an empty input, the most common leading
verbs (the diversity view of the Self-Instruct paper, Figure 2), the histogram of each
instruction's highest ROUGE-L to the seeds (Figure 3), rejects by reason when a
`<name>.rejected.jsonl` sits beside the file, and three random records. `--html` writes one
self-contained page with the same views as embedded PNG plots, the loss curve of a run folder
(`--run`), and a searchable table of records.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import option
from pipeline.errors import UserError
from pipeline.jsonl import atomic_write, check_fields, check_output_path, load_records, read_records, rejected_path_for
from pipeline.lang import language_of, text_length

HISTOGRAM_BINS = 20  # 0.05-wide bins over ROUGE-L 0..1, as in the paper's Figure 3
TOP_VERBS_SHOWN = 20
TEXT_PREVIEW_CHARS = 160  # per field in the terminal samples; the HTML table shows more
TABLE_PREVIEW_CHARS = 600

# Words that open an instruction without being its task verb ("Please summarize ...").
LEADING_FILLER = {"please", "kindly", "now", "then", "also", "first", "briefly", "carefully", "quickly", "simply"}
QUESTION_WORDS = {"what", "who", "whom", "whose", "which", "when", "where", "why", "how", "is", "are", "do", "does",
                  "can", "could", "should", "would", "will", "did"}
# Japanese requests end in a verb + a request form. Most task verbs are a kanji noun + する
# (要約する, 翻訳する): that noun names the task. Others (書いてください) keep their stem.
JA_SURU_VERB = re.compile(r"([一-龯々ァ-ヶー]+)(?:してください|して下さい|しなさい|してほしい|せよ|して|する)")
JA_OTHER_VERB = re.compile(r"([一-龯々]+[ぁ-ん]{0,2}?)(?:てください|でください|なさい|て|で)[。．!！]?\s*$")

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
    samples: int = option(3, "random records to print")
    table_rows: int = option(1000, "records in the report's searchable table")
    seed: int = option(0, "random seed for the sampled records")

    def __post_init__(self):
        if self.samples < 0:
            raise UserError(f"--samples {self.samples}: must be 0 or more")
        if self.table_rows < 0:
            raise UserError(f"--table-rows {self.table_rows}: must be 0 or more")


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
    if "max_rouge_l" in first and "most_similar" in first and "request_id" not in first:
        return "filtered instructions"
    if "instruction" in first:
        return "generated instructions"
    return "unknown records"


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
    lengths = [text_length(t) for t in texts if t.strip()]
    if not lengths:
        return None
    lengths.sort()
    return {"count": len(lengths), "mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
            "p90": lengths[int(0.9 * (len(lengths) - 1))], "max": lengths[-1]}


def leading_verb(instruction: str) -> str:
    """The task verb an instruction opens with ("Summarize the text" -> "summarize").

    A heuristic rather than a parser: spaCy's English models are not on PyPI, and imperative
    instructions put their verb first, so skipping fillers gets the same top list the paper's
    Figure 2 shows. Questions are grouped as "(question)"; Japanese uses the word before the
    request ending (要約してください -> 要約).
    """
    text = instruction.strip()
    if language_of(text) == "ja":
        first_sentence = re.split(r"[。．\n]", text)[0]
        suru = JA_SURU_VERB.findall(first_sentence)
        if suru:
            return suru[-1]
        match = JA_OTHER_VERB.search(first_sentence)
        return match.group(1) if match else "(other)"
    words = re.findall(r"[A-Za-z']+", text.lower())
    while words and words[0] in LEADING_FILLER:
        words.pop(0)
    if not words:
        return "(other)"
    if words[0] in QUESTION_WORDS or text.rstrip().endswith("?"):
        return "(question)"
    return words[0]


def max_rouge_to_seeds(instructions: list[str], seed_instructions: list[str]) -> list[float]:
    """Each instruction's highest ROUGE-L F1 to any seed, exact (the paper's Figure 3)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    from pipeline.similarity import tokenize

    vocabulary: dict[str, int] = {}

    def ids(text: str) -> list[int]:
        return [vocabulary.setdefault(token, len(vocabulary)) for token in tokenize(text)]

    seed_ids = [ids(s) for s in seed_instructions]
    query_ids = [ids(s) for s in instructions]
    if not seed_ids or not query_ids:
        return [0.0] * len(instructions)
    # Indel normalized similarity on token ids is 2*LCS/(m+n): ROUGE-L F1 with beta 1.
    scores = process.cdist(query_ids, seed_ids, scorer=Indel.normalized_similarity, workers=-1)
    return [float(row.max()) for row in scores]


def rejected_reasons(path: Path) -> dict[str, int] | None:
    rejected = rejected_path_for(path)
    if not rejected.exists() or path.name.endswith(".rejected.jsonl"):
        return None
    counts = collections.Counter(r.get("reason", "(none)") for _, r in read_records(rejected))
    return dict(counts.most_common())


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
        "lengths": {field: length_stats([r[field] for r in rows]) for field in ("instruction", "input", "output")},
        "empty_input_share": round(sum(not r["input"].strip() for r in rows) / len(rows), 3),
        "leading_verbs": verbs.most_common(TOP_VERBS_SHOWN),
        "distinct_leading_verbs": len(verbs),
        "max_rouge_l_to_seeds": similarities,
        "rejected": rejected_reasons(Path(cfg.file)),
    }
    if "is_classification" in records[0]:
        summary["classification_share"] = round(sum(bool(r.get("is_classification")) for r in records) / len(records), 3)
    return summary


# --- the terminal view -----------------------------------------------------------------------

def print_summary(summary: dict, records: list[dict], cfg: Config) -> None:
    print(f"{summary['file']}: {summary['records']:,} {summary['kind']}")
    print("languages: " + ", ".join(f"{lang} {n:,}" for lang, n in summary["languages"].items()))
    print("lengths (words; characters for Japanese):")
    for field, stats in summary["lengths"].items():
        if stats:
            print(f"  {field:<12} n={stats['count']:<6,} mean {stats['mean']:<7} median {stats['median']:<6} "
                  f"p90 {stats['p90']:<6} max {stats['max']}")
    print(f"empty input: {summary['empty_input_share']:.1%}")
    if "classification_share" in summary:
        print(f"classification tasks: {summary['classification_share']:.1%}")
    verbs = ", ".join(f"{verb} {n}" for verb, n in summary["leading_verbs"][:10])
    print(f"leading verbs ({summary['distinct_leading_verbs']} distinct): {verbs}")
    if summary["max_rouge_l_to_seeds"]:
        print("highest ROUGE-L to a seed:")
        for low, high, count in histogram(summary["max_rouge_l_to_seeds"], bins=10):
            print(f"  {low:.1f}-{high:.1f} {'#' * min(count, 60)} {count}")
    if summary["rejected"]:
        print("rejected beside it: " + ", ".join(f"{reason} {n:,}" for reason, n in summary["rejected"].items()))
    rng = random.Random(cfg.seed)
    for record in rng.sample(records, min(cfg.samples, len(records))):
        print("---")
        for field, value in flatten(record).items():
            if value:
                text = value.replace("\n", " ")
                print(f"{field}: {text[:TEXT_PREVIEW_CHARS]}{'...' if len(text) > TEXT_PREVIEW_CHARS else ''}")


def histogram(values: list[float], bins: int) -> list[tuple[float, float, int]]:
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    return [(i / bins, (i + 1) / bins, c) for i, c in enumerate(counts)]


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

    plots = {}
    if summary["max_rouge_l_to_seeds"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(summary["max_rouge_l_to_seeds"], bins=HISTOGRAM_BINS, range=(0, 1), color="#4c72b0")
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
    lengths = [(field, stats) for field, stats in summary["lengths"].items() if stats]
    if lengths:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([f for f, _ in lengths], [s["mean"] for _, s in lengths], color="#c44e52", label="mean")
        ax.bar([f for f, _ in lengths], [s["median"] for _, s in lengths], color="#dd8452", width=0.4, label="median")
        ax.set_ylabel("words (characters for Japanese)")
        ax.legend()
        ax.set_title("Lengths")
        plots["lengths"] = png_data_uri(fig)
    if run is not None:
        loss = loss_curve_plot(run, plt)
        if loss:
            plots["loss"] = loss
    return plots


def loss_curve_plot(run: Path, plt) -> str | None:
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    from pipeline.finetune import draw_loss  # the same picture as the run's own loss.png

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
box.addEventListener('input', () => {
  const q = box.value.toLowerCase();
  let n = 0;
  for (const row of rows) { const hit = row.textContent.toLowerCase().includes(q); row.style.display = hit ? '' : 'none'; n += hit; }
  shown.textContent = n;
});
"""


def render_html(summary: dict, records: list[dict], plots: dict[str, str], cfg: Config) -> str:
    e = html.escape
    stats_rows = "".join(
        f"<tr><td>{e(field)}</td><td>{s['count']:,}</td><td>{s['mean']}</td><td>{s['median']}</td><td>{s['p90']}</td><td>{s['max']}</td></tr>"
        for field, s in summary["lengths"].items() if s)
    facts = [("kind", summary["kind"]), ("records", f"{summary['records']:,}"),
             ("languages", ", ".join(f"{k} {v:,}" for k, v in summary["languages"].items())),
             ("empty input", f"{summary['empty_input_share']:.1%}"),
             ("distinct leading verbs", str(summary["distinct_leading_verbs"]))]
    if "classification_share" in summary:
        facts.append(("classification tasks", f"{summary['classification_share']:.1%}"))
    if summary["rejected"]:
        facts.append(("rejected beside it", ", ".join(f"{k} {v:,}" for k, v in summary["rejected"].items())))
    facts_html = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    titles = {"similarity": "Similarity to the seeds", "verbs": "Leading verbs", "lengths": "Lengths", "loss": "Loss curve"}
    plots_html = "".join(f'<h2>{titles[name]}</h2><img class="plot" alt="{titles[name]}" src="{uri}">'
                         for name, uri in plots.items())
    shown = records[: cfg.table_rows]
    similarities = summary["max_rouge_l_to_seeds"]
    table_rows = []
    for i, record in enumerate(shown):
        row = flatten(record)
        cells = "".join(f'<td class="text">{e(row[f][:TABLE_PREVIEW_CHARS])}</td>' for f in ("instruction", "input", "output"))
        score = f"{similarities[i]:.2f}" if similarities else ""
        table_rows.append(f"<tr><td>{i + 1}</td>{cells}<td>{score}</td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset report: {e(Path(cfg.file).name)}</title>
<style>{PAGE_STYLE}</style></head><body>
<h1>Dataset report: {e(str(cfg.file))}</h1>
<table class="stats">{facts_html}</table>
<h2>Lengths <span class="muted">(words; characters for Japanese)</span></h2>
<table class="stats"><tr><th>field</th><th>non-empty</th><th>mean</th><th>median</th><th>p90</th><th>max</th></tr>{stats_rows}</table>
{plots_html}
<h2>Records <span class="muted">(<span id="shown">{len(shown):,}</span> of {len(records):,} shown)</span></h2>
<input id="search" type="search" placeholder="search instructions, inputs and outputs">
<table id="records"><thead><tr><th>#</th><th>instruction</th><th>input</th><th>output</th><th>ROUGE-L to seeds</th></tr></thead>
<tbody>{''.join(table_rows)}</tbody></table>
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


def run(cfg: Config) -> dict:
    path = Path(cfg.file)
    records = load_records(path, validate=lambda record, line: check_fields(
        record, CHAT_RECORD if "messages" in record else INSTRUCTION_RECORD, path, line))
    if cfg.html:
        check_output_path(cfg.html, "--html")
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

