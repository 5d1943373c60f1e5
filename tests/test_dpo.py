"""The dpo stage on the tiny model: it learns the preferences, resumes exactly, starts at log 2, refuses bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dpo import REFERENCE_FILE, Config, PairBatches, make_preference_module, run
from pipeline.errors import UserError
from pipeline.preference_loss import sequence_logps
from pipeline.preferences import make_pair, training_records
from pipeline.templates import encode_example
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [  # (instruction, input, chosen, rejected)
    ("日本の首都はどこですか。", "", "東京です。", "大阪だと思います。"),
    ("「ありがとう」を英語に訳してください。", "", "Thank you.", "ありがとう。"),
    ("Name a colour.", "", "Blue.", "I cannot answer that."),
    ("Add the numbers.", "2 and 3", "5", "23"),
    ("次の文を丁寧に言い換えてください。", "これ見て。", "こちらをご覧ください。", "見ろ。"),
    ("Give an antonym.", "hot", "cold", "hot"),
]


def pairs(fmt: str = "alpaca") -> list[dict]:
    return [make_pair(f"pair-{i}", q, x, c, r, fmt=fmt) for i, (q, x, c, r) in enumerate(QUESTIONS)]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "preferences.jsonl", pairs())


def fast(data, out, model, **kw) -> Config:
    """Small enough for a test: all six pairs in one batch, a high constant learning rate, fp32 on the CPU."""
    base = dict(data=str(data), output_dir=str(out), model=str(model), batch_size=6, lr=1e-3, lr_schedule="constant",
                warmup_ratio=0.0, save_every=0, device="cpu", precision="fp32", seed=0, max_steps=20)
    base.update(kw)
    return Config(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_reward_accuracy_rises_from_a_coin_flip_and_every_parameter_changes(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    stats = run(fast(data, out, tiny_model_dir, max_steps=30))
    history = metrics(out)
    assert [h["step"] for h in history] == list(range(1, 31))
    # Step 0 is the reference itself: every reward is 0, the loss log 2, the accuracy a coin flip.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["reward_accuracy"] == pytest.approx(0.5)
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["reward_accuracy"] >= 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["chosen_logps"] - history[-1]["rejected_logps"] > history[0]["chosen_logps"] - history[0]["rejected_logps"]
    assert all(h["trained_tokens_per_s"] > 0 and h["pairs"] == 6 for h in history)
    before, after = weights(tiny_model_dir), weights(out)
    assert before.keys() == after.keys()
    assert [name for name in before if bool((before[name] == after[name]).all())] == []
    assert stats.steps == 30 and stats.trained_pairs == 6
    for name in ("loss.png", "train_config.json", "tokenizer.json", REFERENCE_FILE):
        assert (out / name).exists(), name
    config = json.loads((out / "train_config.json").read_text())
    assert config["stage"] == "dpo" and config["config"]["template"] == "alpaca"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    # The saved tokenizer prompts a served model as training did (the Alpaca prompt).
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0][0]}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(f"### Instruction:\n{QUESTIONS[0][0]}\n\n### Response:")


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, data, tmp_path):
    import torch

    cfg = fast(data, tmp_path / "a", tiny_model_dir, max_steps=4, save_every=2, batch_size=3, lr=1e-3, lr_schedule="cosine")
    run(cfg)
    straight = weights(tmp_path / "a")
    # The run dies after step 2: the final model is gone; resume reads the reference log-probs back.
    (tmp_path / "a" / "model.safetensors").unlink()
    reference = json.loads((tmp_path / "a" / REFERENCE_FILE).read_text())
    run(Config(**{**cfg.__dict__, "resume": True}))
    resumed = weights(tmp_path / "a")
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    assert json.loads((tmp_path / "a" / REFERENCE_FILE).read_text()) == reference
    assert [h["step"] for h in metrics(tmp_path / "a")] == [1, 2, 3, 4]
    # A reference file that does not belong to this run is refused, not trained against.
    (tmp_path / "a" / REFERENCE_FILE).write_text(json.dumps({**reference, "ids": reference["ids"][::-1]}))
    with pytest.raises(UserError, match=f"{REFERENCE_FILE}: computed for other pairs"):
        run(Config(**{**cfg.__dict__, "resume": True}))


def test_a_run_refuses_a_folder_with_another_runs_checkpoints(tiny_model_dir, data, tmp_path):
    cfg = fast(data, tmp_path / "a", tiny_model_dir, max_steps=2, save_every=1)
    run(cfg)
    with pytest.raises(UserError, match="holds checkpoints of an earlier run .*--resume.*--overwrite"):
        run(cfg)
    run(Config(**{**cfg.__dict__, "overwrite": True}))
    assert len(metrics(tmp_path / "a")) == 2


def test_simpo_runs_without_a_reference_and_its_loss_falls(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", pairs("messages"))
    out = tmp_path / "simpo"
    run(fast(data, out, tiny_model_dir, loss="simpo", max_steps=15))
    history = metrics(out)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["reward_accuracy"] >= 0.9
    assert not (out / REFERENCE_FILE).exists()
    config = json.loads((out / "train_config.json").read_text())
    assert config["config"]["template"] == "chat" and config["beta"] == 2.0


@pytest.mark.parametrize("packing", [True, False])
def test_per_answer_log_probs_equal_the_full_model_ones(tiny_model_dir, packing):
    """Our gather-then-head sums over packed or padded rows equal `sequence_logps` on each answer's full logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # A long answer makes room for short ones to share its row width.
    long = make_pair("long", "日本について説明してください。", "", "日本は島国です。" * 20, "知りません。")
    examples = [encode_example(r, tokenizer, "alpaca", 512) for p in [*pairs(), long] for r in training_records(p)]
    cfg = Config(data="x", model=str(tiny_model_dir), packing=packing, max_length=512)
    batches = PairBatches(cfg, examples, tokenizer.pad_token_id, False, 1, 0)
    batch = batches.collate([0, 1, 6])
    with torch.no_grad():
        sums = make_preference_module(model, "dpo", 0.1)(**{k: v for k, v in batch.items() if hasattr(v, "to")},
                                                         logps_only=True)
        expected = []
        for index in (0, 2, 12, 1, 3, 13):  # chosen of pairs 0, 1, 6, then their rejected
            ids = torch.tensor([examples[index].input_ids])
            expected.append(sequence_logps(model(ids).logits, torch.tensor([examples[index].labels])).item())
    assert (batch["input_ids"].shape[0] < 6) == packing  # packing really put several answers in a row
    assert batch["input_ids"].shape[1] == max(len(examples[i].input_ids) for i in (0, 2, 12, 1, 3, 13))
    assert sums.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-4)  # float32 sums of up to ~3000


def test_a_bad_pairs_file_is_one_line_and_exit_2(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [pairs()[0], {**pairs()[1], "rejected": pairs()[1]["chosen"]}])
    result = subprocess.run([sys.executable, "-m", "pipeline", "dpo", "--data", str(bad), "--model", str(tiny_model_dir),
                             "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {bad}:2: rejected: the same answer as chosen: there is nothing to prefer"]
    assert not (tmp_path / "out").exists()


def test_a_standard_pair_without_instruction_names_its_line(tmp_path, tiny_model_dir):
    record = {k: v for k, v in pairs()[1].items() if k != "instruction"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [pairs()[0], record])
    with pytest.raises(UserError, match=rf"{bad}:2: instruction: pair 'pair-1'"):
        run(fast(bad, tmp_path / "out", tiny_model_dir))


def test_bad_flags_are_user_errors():
    for kw, flag in [({"beta": 0.0}, "--beta"), ({"merge": True}, "--merge"), ({"max_steps": 0}, "--max-steps"),
                     ({"resume": True, "overwrite": True}, "--overwrite")]:
        with pytest.raises(UserError, match=flag):
            Config(**kw)


@pytest.mark.slow
def test_lora_trains_adapters_only_and_merges(tiny_model_dir, data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run(fast(data, out, tiny_model_dir, max_steps=3, lora=4, merge=True, lr=1e-2))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        assert not torch.allclose(merged(ids).logits, plain, atol=1e-4)
    assert torch.equal(weights(out)["model.embed_tokens.weight"], weights(tiny_model_dir)["model.embed_tokens.weight"])


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_accumulating_two(tiny_model_dir, data, tmp_path):
    import os

    import torch

    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 6 pairs in micro-batches of 2: 3 micro-batches for 2 processes, so one rank runs a filler in step 2.
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "dpo", "--data", str(data),
         "--model", str(tiny_model_dir), "--output-dir", str(out), "--batch-size", "2", "--device", "cpu",
         "--precision", "fp32", "--lr", "1e-3", "--lr-schedule", "constant", "--warmup-ratio", "0", "--seed", "0"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "train_config.json").read_text())["processes"] == 2
    assert [h["pairs"] for h in metrics(out)] == [4, 2]  # the filler counts for nothing
    assert result.stdout.count("pre-flight") == 1
    run(fast(data, tmp_path / "one", tiny_model_dir, max_steps=-1, batch_size=2, grad_accum=2))
    assert [h["pairs"] for h in metrics(tmp_path / "one")] == [4, 2]
    single, ddp = weights(tmp_path / "one"), weights(out)
    for name in single:
        assert torch.allclose(single[name], ddp[name], atol=1e-5), name


def test_template_auto_follows_the_pairs_then_the_model_s_sft_template(tiny_model_dir, tmp_path):
    import shutil

    from pipeline.dpo import resolve_template

    sft = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, sft)
    cfg = Config(data="x", model=str(sft))
    assert resolve_template(cfg, pairs()).template == "alpaca"  # no train_config.json: Alpaca
    (sft / "train_config.json").write_text(json.dumps({"stage": "finetune", "config": {"template": "chat"}}))
    assert resolve_template(cfg, pairs()).template == "chat"  # the prompt format the model was tuned on
    assert resolve_template(cfg, pairs("messages")).template == "chat"
    assert resolve_template(Config(data="x", model=str(sft), template="alpaca"), pairs()).template == "alpaca"


def test_the_output_folder_may_not_be_the_model_it_starts_from(tiny_model_dir, data):
    with pytest.raises(UserError, match="--output-dir .*is the --model folder"):
        run(fast(data, tiny_model_dir, tiny_model_dir))
