"""pipeline/inspect.py: stage detection, the statistics, the terminal summary and the HTML report in a real browser."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline.inspect import Config, detect_kind, flatten, histogram, leading_verb, length_stats, max_rouge_to_seeds

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

ALPACA = [
    {"instruction": "Summarize the following paragraph in one sentence.", "input": "The cat sat on the mat all day.", "output": "A cat spent the day on a mat."},
    {"instruction": "Please translate this sentence into French.", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "What is the capital of Japan?", "input": "", "output": "Tokyo."},
    {"instruction": "次の文章を要約してください。", "input": "今日は晴れで、公園に多くの人が集まった。", "output": "晴れた公園に人が集まった。"},
    {"instruction": "Write a haiku about autumn leaves.", "input": "", "output": "Red leaves drift and fall\nquiet paths beneath old trees\nthe year exhales slow"},
]
SEEDS = [
    {"id": "s1", "instruction": "Summarize the following paragraph in one sentence.", "instances": [{"input": "x", "output": "y"}]},
    {"id": "s2", "instruction": "Name three fruits.", "instances": [{"input": "", "output": "apple"}], "is_classification": False},
]


def test_detect_kind():
    assert detect_kind(ALPACA) == "training data (alpaca)"
    assert detect_kind(SEEDS) == "seed tasks"
    assert detect_kind([{"messages": [{"role": "user", "content": "hi"}]}]) == "chat training data (messages)"
    assert detect_kind([{"instruction": "a", "max_rouge_l": 0.2, "most_similar": {}}]) == "filtered instructions"
    assert detect_kind([{"instruction": "a", "request_id": "r", "max_rouge_l": 0.2, "most_similar": {}}]) == "generated instructions"
    assert detect_kind([{"instruction": "a", "reason": "too_long"}]) == "rejected records"
    assert detect_kind([{"output": "a", "prediction": "b"}]) == "eval predictions"


@pytest.mark.parametrize("instruction, verb", [
    ("Summarize the following paragraph.", "summarize"),
    ("Please translate this into German.", "translate"),
    ("What is the capital of France?", "(question)"),
    ("次の文章を要約してください。", "要約"),
    ("以下の文を英語に翻訳して", "翻訳"),
    ("俳句を一つ書いてください。", "書い"),
    ("!!!", "(other)"),
])
def test_leading_verb(instruction, verb):
    assert leading_verb(instruction) == verb


def test_lengths_count_words_and_japanese_characters():
    assert length_stats(["one two three", "four five", ""]) == {"count": 2, "mean": 2.5, "median": 2.5, "p90": 2, "max": 3}
    assert length_stats(["日本語です"])["max"] == 5
    assert length_stats(["", " "]) is None


def test_flatten_messages_and_seeds():
    assert flatten({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]}) == {"instruction": "u", "input": "", "output": "a"}
    assert flatten(SEEDS[0]) == {"instruction": SEEDS[0]["instruction"], "input": "x", "output": "y"}


def test_max_rouge_to_seeds_is_exact():
    scores = max_rouge_to_seeds(["Summarize the following paragraph in one sentence.", "Name three fruits please", "zzz"],
                                [s["instruction"] for s in SEEDS])
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(2 * 3 / (4 + 3))
    assert scores[2] == 0.0


def test_histogram_bins():
    assert histogram([0.0, 0.05, 0.5, 1.0], bins=2) == [(0.0, 0.5, 2), (0.5, 1.0, 2)]


def test_bad_flags():
    with pytest.raises(Exception, match="--samples"):
        Config(samples=-1)


def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "inspect", *args], cwd=ROOT, capture_output=True, text=True)


def make_dataset(tmp_path):
    data = write_jsonl(tmp_path / "alpaca_data.jsonl", ALPACA)
    write_jsonl(tmp_path / "alpaca_data.rejected.jsonl", [{"instruction": "x", "output": "", "reason": "empty_output"},
                                                          {"instruction": "y", "output": "y", "reason": "output_equals_instruction"},
                                                          {"instruction": "z", "output": "", "reason": "empty_output"}])
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_jsonl(run_dir / "metrics.jsonl", [{"step": s, "loss": 3.0 / s} for s in range(1, 11)] + [{"step": 10, "val_loss": 0.5}])
    return data, seeds, run_dir


def test_terminal_summary(tmp_path):
    data, seeds, _ = make_dataset(tmp_path)
    result = run_inspect(str(data), "--seeds", str(seeds), "--samples", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{data}: 5 training data (alpaca)" in out
    assert "languages: en 4, ja 1" in out
    assert "empty input: 40.0%" in out
    assert "rejected beside it: empty_output 2, output_equals_instruction 1" in out
    assert "summarize" in out and "要約" in out
    assert out.count("---") == 2


def test_html_report_renders_in_chromium(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it)")
    data, seeds, run_dir = make_dataset(tmp_path)
    report = tmp_path / "report.html"
    result = run_inspect(str(data), "--seeds", str(seeds), "--html", str(report), "--run", str(run_dir))
    assert result.returncode == 0, result.stderr
    page = report.read_text("utf-8")
    assert page.count('class="plot"') == 4  # similarity, verbs, lengths, loss
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    # The browser runs a copy of the page with a probe that records, after load, how many
    # plots decoded and what the search box leaves visible; the page itself carries no test code.
    probe = """<script>window.addEventListener('load', () => {
      const imgs = Array.from(document.querySelectorAll('img.plot'));
      document.body.dataset.plotsDecoded = imgs.filter(i => i.complete && i.naturalWidth > 100).length;
      const box = document.getElementById('search'); box.value = '要約'; box.dispatchEvent(new Event('input'));
      document.body.dataset.visibleRows = Array.from(document.querySelectorAll('#records tbody tr')).filter(r => r.style.display !== 'none').length;
    });</script></body>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe), "utf-8")
    browser = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert browser.returncode == 0, browser.stderr[-2000:]
    dom = browser.stdout
    assert re.search(r'data-plots-decoded="4"', dom), dom[:500]
    assert re.search(r'data-visible-rows="1"', dom)
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
