"""pipeline/inspect.py: stage detection, the statistics, the terminal summary and the HTML report in a real browser."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline.inspect import (Config, detect_kind, flatten, histogram, lang_attribute, leading_verb, length_stats,
                              lengths_by_language, make_plots, max_rouge_to_seeds)

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
    # generate's output after filter: generate's keys kept, the filter's own added beside them
    assert detect_kind([{"instruction": "a", "request_id": "r", "max_rouge_l": 0.2, "most_similar": "machine_000001",
                         "filter_max_rouge_l": 0.3, "filter_most_similar": {"id": "s", "instruction": "b"}}]) == "filtered instructions"
    assert detect_kind([{"instruction": "a", "reason": "too_long"}]) == "rejected records"
    assert detect_kind([{"output": "a", "prediction": "b"}]) == "eval predictions"


@pytest.mark.parametrize("instruction, verb", [
    ("Summarize the following paragraph.", "summarize"),
    ("Please translate this into German.", "translate"),
    ("What is the capital of France?", "(question)"),
    ("!!!", "(other)"),
    # Japanese: the task verb in dictionary form, whatever request form follows it.
    ("次の文章を要約してください。", "要約する"),
    ("以下の文を英語に翻訳して", "翻訳する"),
    ("俳句を一つ書いてください。", "書く"),
    ("次の単語をひらがなに換えてください。", "換える"),
    ("「ら抜き言葉」を正しい形に置き換えなさい。", "置き換える"),
    ("勉強の計画を立ててください。", "立てる"),  # not 勉強: the verb, not a noun before it
    ("この文をもっと短くしてください。", "短くする"),
    ("次の文章を一文で要約せよ。", "要約する"),
    ("ちょっと手紙書いてくれる？", "書く"),  # a casual request ending in ？ is still a request
    ("次の文の感情を判定し、「肯定」か「否定」で答えてください。", "答える"),  # quotes are not the request
    ("次の英文を翻訳してください: The library opens at nine.", "翻訳する"),
    ("日本の首都はどこですか？", "(question)"),
    ("次の文は「平叙文」「疑問文」のどれにあたりますか。", "(question)"),
])
def test_leading_verb(instruction, verb):
    assert leading_verb(instruction) == verb


def test_lengths_count_words_and_japanese_characters():
    # p90 by nearest rank: of two lengths, 90% are covered only by the larger one.
    assert length_stats(["one two three", "four five", ""]) == {"count": 2, "mean": 2.5, "median": 2.5, "p90": 3, "max": 3}
    assert length_stats(["日本語です"])["max"] == 5
    assert length_stats(["", " "]) is None


def test_p90_is_the_nearest_rank_percentile():
    import numpy
    lengths = [3, 9, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    texts = [" ".join(["w"] * n) for n in lengths]
    assert length_stats(texts)["p90"] == numpy.percentile(lengths, 90, method="inverted_cdf") == 9
    assert length_stats([" ".join(["w"] * n) for n in range(1, 11)])["p90"] == 9


def test_lengths_are_per_language_never_averaged_together():
    texts = ["one two three", "four five", "日本語です", "要約してください。", ""]
    by_language = lengths_by_language(texts)
    assert set(by_language) == {"en", "ja"}
    assert by_language["en"] == {"count": 2, "mean": 2.5, "median": 2.5, "p90": 3, "max": 3}  # words
    assert by_language["ja"] == {"count": 2, "mean": 7.0, "median": 7.0, "p90": 9, "max": 9}  # characters


def test_japanese_cells_are_marked_lang_ja():
    assert lang_attribute("次の文章を要約してください。") == ' lang="ja"'
    assert lang_attribute("Summarize the text.") == ""
    assert lang_attribute("") == ""


def test_plots_register_a_bundled_japanese_font_and_draw_japanese_without_missing_glyphs():
    import warnings

    import matplotlib
    from matplotlib import font_manager

    from pipeline.plot_fonts import FONT_NAME, japanese_font_path

    assert "site-packages" in str(japanese_font_path()) and japanese_font_path().name == "ipaexg.ttf"  # from the wheel
    summary = {"max_rouge_l_to_seeds": [0.1, 0.4], "leading_verbs": [("要約する", 3), ("書く", 2), ("summarize", 1)],
               "lengths": lengths_by_language(["日本語です", "one two"])}
    summary["lengths"] = {"instruction": summary["lengths"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots = make_plots(summary, None)
    assert {"similarity", "verbs", "lengths"} == set(plots)
    assert [str(w.message) for w in caught if "missing from font" in str(w.message)] == []
    assert FONT_NAME in {entry.name for entry in font_manager.fontManager.ttflist}
    assert FONT_NAME in matplotlib.rcParams["font.family"]
    # The check above can fail: without the font, the same drawing warns about each kanji.
    matplotlib.rcParams["font.family"] = ["DejaVu Sans"]
    try:
        import matplotlib.pyplot as plt

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig, ax = plt.subplots()
            ax.set_title("要約")
            fig.canvas.draw()
            plt.close(fig)
        assert any("missing from font" in str(w.message) for w in caught)
    finally:
        matplotlib.rcParams["font.family"] = ["DejaVu Sans", FONT_NAME]


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
    assert "summarize" in out and "要約する 1" in out
    # Per language, each in its own unit: 4 English instructions in words, 1 Japanese in characters.
    assert re.search(r"instruction +en words +n=4 ", out)
    assert re.search(r"instruction +ja characters +n=1 +mean 14.0 ", out)  # 次の文章を要約してください。
    assert out.count("---") == 2


def test_html_report_marks_japanese_cells_and_gives_lengths_per_language(tmp_path):
    data, seeds, _ = make_dataset(tmp_path)
    report = tmp_path / "report.html"
    result = run_inspect(str(data), "--seeds", str(seeds), "--html", str(report))
    assert result.returncode == 0, result.stderr
    page = report.read_text("utf-8")
    assert page.count('<td class="text" lang="ja">') == 3  # the Japanese record's instruction, input and output
    assert page.count('<td class="text">') == 12  # the four English records' cells stay in the page's language
    assert "<td>instruction</td><td>ja</td><td>characters</td><td>1</td><td>14.0</td>" in page
    assert "<td>instruction</td><td>en</td><td>words</td><td>4</td>" in page


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


def test_terminal_control_characters_in_generated_text_are_shown_escaped(tmp_path):
    # ESC sequences (colour, window title, clear screen), BEL, a C1 CSI and a right-to-left override.
    record = {"instruction": "要約して\x1b]0;pwned\x07ください", "input": "", "output": "ok\x1b[31mRED\x9b2J\u202eevil"}
    data = write_jsonl(tmp_path / "ctrl.jsonl", [record])
    result = run_inspect(str(data), "--samples", "1")
    assert result.returncode == 0, result.stderr
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", result.stdout), "a raw control character reached the terminal"
    assert "instruction: 要約して\\x1b]0;pwned\\x07ください" in result.stdout
    assert "output: ok\\x1b[31mRED\\x9b2J\\u202eevil" in result.stdout


def test_a_seed_instance_that_is_not_an_object_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "seeds.jsonl", [{"id": "s0", "instruction": "日本語で答えて。", "instances": [{"output": "はい"}]},
                                                  {"id": "s1", "instruction": "Say hi.", "instances": [1]}])
    result = run_inspect(str(data))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {data}:2: instances[0]: expected a JSON object, got int"
