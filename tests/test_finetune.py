"""Fine-tuning: packing isolates records, a tiny model learns, resume, DDP on CPU, LoRA."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.batching import collate, packing_honoured, plan_batches
from pipeline.errors import InputError, UserError
from pipeline.finetune import Config, make_loss_module, run
from pipeline.templates import encode_example
from tests.conftest import write_jsonl

RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Say hello in French.", "output": "Bonjour !"},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
    {"instruction": "Count to three.", "output": "one, two, three"},
    {"instruction": "Name a planet.", "output": "Mars"},
    {"instruction": "Spell cat backwards.", "output": "tac"},
    {"instruction": "What is 10 minus 4?", "output": "6"},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", RECORDS)


def fast(data, out, **kw) -> Config:
    """A config small enough for a test: no validation, tiny batches, a high learning rate."""
    base = dict(data=str(data), output_dir=str(out), val_fraction=0.0, eval_every=0, save_every=0, batch_size=4,
                lr=1e-2, lr_schedule="constant", device="cpu", seed=0)
    base.update(kw)
    return Config(**base)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("block_mask", [False, True])
def test_packed_loss_equals_token_weighted_loss_of_records_one_by_one(tiny, block_mask):
    import torch

    model, tok = tiny
    model.eval()
    examples = [encode_example(r, tok, "alpaca", 512) for r in RECORDS[:5]]
    loss = make_loss_module(model)
    with torch.no_grad():
        packed_sum, packed_correct, packed_n = loss(**without_counts(collate([[0, 1, 2], [3, 4]], examples, tok.pad_token_id, block_mask)))
        alone = [loss(**without_counts(collate([[i]], examples, tok.pad_token_id))) for i in range(5)]
        # A row of the same records with positions running on (no isolation) must differ,
        # or this test could not catch leakage.
        leaky = collate([[0, 1, 2]], examples, tok.pad_token_id)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
        leaky_sum, _, leaky_n = loss(**without_counts(leaky))
    alone_sum = sum(float(s) for s, _, _ in alone)
    alone_n = sum(n for _, _, n in alone)
    assert packed_n == alone_n == sum(e.num_trained_tokens for e in examples)
    assert float(packed_sum) / packed_n == pytest.approx(alone_sum / alone_n, abs=1e-4)
    assert int(packed_correct) == sum(int(c) for _, c, _ in alone)
    three_alone = sum(float(s) for s, _, _ in alone[:3]) / sum(n for _, _, n in alone[:3])
    assert abs(float(leaky_sum) / leaky_n - three_alone) > 1e-3


def without_counts(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "real_tokens"}


def test_response_loss_matches_the_full_model_loss(tiny):
    """Our gather-then-head loss equals transformers' own loss over all positions."""
    import torch

    model, tok = tiny
    model.eval()
    ex = encode_example(RECORDS[1], tok, "alpaca", 512)
    batch = collate([[0]], [ex], tok.pad_token_id)
    with torch.no_grad():
        ours, _, n = make_loss_module(model)(**without_counts(batch))
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert n == ex.num_trained_tokens
    assert float(ours) / n == pytest.approx(float(reference), abs=1e-5)


def test_packed_response_loss_equals_plain_cross_entropy_over_full_logits(tiny):
    """Loss and hits over response positions only equal cross-entropy over every position's logits."""
    import torch
    import torch.nn.functional as F

    model, tok = tiny
    model.eval()
    records = RECORDS[:3] + [{"instruction": "日本の首都は？", "output": "東京です。"}]
    examples = [encode_example(r, tok, "alpaca", 512) for r in records]
    batch = collate([[0, 3], [1, 2]], examples, tok.pad_token_id)
    # The reference isolates records with the explicit block-diagonal mask, not by position_ids.
    masked = collate([[0, 3], [1, 2]], examples, tok.pad_token_id, block_mask=True)
    with torch.no_grad():
        ours, correct, n = make_loss_module(model)(**without_counts(batch))
        logits = model(input_ids=masked["input_ids"], position_ids=masked["position_ids"],
                       attention_mask=masked["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        keep = targets != -100
        hits = int((logits.argmax(-1)[keep] == targets[keep]).sum())
    assert n == int(keep.sum()) == sum(e.num_trained_tokens for e in examples)
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    assert int(correct) == hits


def test_the_optimizer_is_fused_adamw_with_the_plain_update(tiny_model_dir):
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from pipeline.training import make_trainer

    def one_step(fused_expected: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trainer = make_trainer(make_loss_module(model), Accelerator(cpu=True), "fp32", lr=1e-2, weight_decay=0.1,
                               schedule="constant", warmup_ratio=0.0, total_steps=1)
        assert bool(trainer.optimizer.defaults["fused"]) is fused_expected
        ids = torch.arange(2, 12)[None]
        loss_sum, _, _ = trainer.module(input_ids=ids, labels=ids, position_ids=torch.arange(10)[None])
        loss_sum.backward()
        trainer.optimizer.step()
        return {k: p.detach().clone() for k, p in model.named_parameters()}

    fused = one_step(True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    ids = torch.arange(2, 12)[None]
    make_loss_module(model)(input_ids=ids, labels=ids, position_ids=torch.arange(10)[None])[0].backward()
    plain.step()
    for name, p in model.named_parameters():
        assert torch.allclose(fused[name], p.detach(), atol=1e-6), name


def test_position_ids_are_honoured_on_cpu(tiny):
    assert packing_honoured(tiny[0], "cpu")


def test_length_grouped_batches_cover_every_record_once(tiny):
    _, tok = tiny
    examples = [encode_example(r, tok, "alpaca", 512) for r in RECORDS]
    batches = plan_batches(examples, batch_size=3, packing=False, max_length=512, seed=1, epoch=0)
    assert sorted(i for b in batches for row in b for i in row) == list(range(len(RECORDS)))
    assert max(len(b) for b in batches) == 3


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_tiny_model_overfits_and_every_parameter_changes(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    stats = run(fast(data, out, model=str(tiny_model_dir), max_steps=40, batch_size=8, lr=1e-2))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 41))
    assert history[-1]["loss"] < history[0]["loss"] / 2
    assert history[-1]["token_accuracy"] > history[0]["token_accuracy"]
    assert all(h["trained_tokens_per_s"] > 0 and h["lr"] == pytest.approx(1e-2) for h in history)
    before, after = weights(tiny_model_dir), weights(out)
    assert before.keys() == after.keys()
    unchanged = [name for name in before if bool((before[name] == after[name]).all())]
    assert unchanged == []
    assert stats.steps == 40 and stats.final_loss == history[-1]["loss"]
    for name in ("loss.png", "train_config.json", "val.jsonl", "tokenizer.json"):
        assert (out / name).exists(), name

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == before["model.embed_tokens.weight"].shape[0]


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_with_the_same_optimizer_state(tiny_model_dir, data, tmp_path):
    import torch

    cfg = fast(data, tmp_path / "a", model=str(tiny_model_dir), max_steps=4, save_every=2, lr=1e-3,
               lr_schedule="cosine", packing=True, val_fraction=0.25, eval_every=2)
    run(cfg)
    straight = weights(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    saved_optimizer = torch.load(ckpt / "optimizer.0.pt", weights_only=True)
    assert saved_optimizer["state"], "Adam moments were saved"
    # Pretend the run died after step 2: drop the final model, then resume. A kill during a later
    # save left a partial `step-N.tmp` folder, and a stray `step-x` folder is no checkpoint either.
    (tmp_path / "a" / "model.safetensors").unlink()
    partial = tmp_path / "a" / "checkpoints" / "step-000004.tmp"
    stray = tmp_path / "a" / "checkpoints" / "step-x"
    for folder in (partial, stray):
        shutil.copytree(ckpt, folder)
    stats = run(Config(**{**cfg.__dict__, "resume": True}))
    assert not partial.exists() and stray.exists()
    resumed = weights(tmp_path / "a")
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert stats.steps == 4
    # Resuming with a different data order is refused rather than silently mixing runs.
    with pytest.raises(UserError, match="--seed"):
        run(Config(**{**cfg.__dict__, "resume": True, "seed": 1}))
    # A new run in the folder would leave the old checkpoints for a later --resume: refused.
    with pytest.raises(UserError, match="holds checkpoints of an earlier run .*--resume.*--overwrite"):
        run(cfg)


@pytest.mark.slow
def test_lora_saves_adapter_and_merges(tiny_model_dir, data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run(fast(data, out, model=str(tiny_model_dir), max_steps=3, lora=4, merge=True))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        assert not torch.allclose(merged(ids).logits, plain, atol=1e-4)  # the adapters learnt something
    # Only adapters trained: the embedding in the merged model is the base one.
    assert torch.equal(weights(out)["model.embed_tokens.weight"], weights(tiny_model_dir)["model.embed_tokens.weight"])


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tiny_model_dir, data, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # 8 records in batches of 3: 3 micro-batches for 2 processes, so one rank runs a filler.
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "finetune", "--data", str(data),
         "--model", str(tiny_model_dir), "--output-dir", str(out), "--epochs", "1", "--batch-size", "3",
         "--val-fraction", "0", "--device", "cpu", "--lr", "1e-3", "--lr-schedule", "constant", "--seed", "0"],
        capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "train_config.json").read_text())
    assert config["processes"] == 2
    assert list(out.glob("*.safetensors")) == [out / "model.safetensors"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert sum(s["trained_tokens"] for s in steps) > 0
    assert result.stdout.count("pre-flight") == 1  # one process reports
    # Two processes with one micro-batch each are one process accumulating two: same data,
    # same token-weighted loss, so the same weights.
    import torch

    run(fast(data, tmp_path / "one", model=str(tiny_model_dir), epochs=1, batch_size=3, grad_accum=2, lr=1e-3))
    single, ddp = weights(tmp_path / "one"), weights(out)
    for name in single:
        assert torch.allclose(single[name], ddp[name], atol=1e-5), name


# ----------------------------------------------------------------------------- errors

def test_bad_flags_are_user_errors(tmp_path):
    for kw, flag in [({"epochs": 0}, "--epochs"), ({"val_fraction": 1.0}, "--val-fraction"),
                     ({"merge": True}, "--merge"), ({"max_steps": 0}, "--max-steps"), ({"lr": 0}, "--lr")]:
        with pytest.raises(UserError, match=flag):
            Config(**kw)


def test_bad_record_names_line_and_field(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"instruction": "no output"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: output: missing"):
        run(fast(path, tmp_path / "out", model=str(tiny_model_dir)))
    assert not (tmp_path / "out").exists()
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InputError, match="--template chat"):
        run(fast(chat, tmp_path / "out", model=str(tiny_model_dir), template="alpaca"))
    with pytest.raises(InputError, match=r"chat.jsonl:1: messages: no assistant turn"):
        run(fast(chat, tmp_path / "out", model=str(tiny_model_dir)))


def test_resume_without_checkpoint_is_a_user_error(tmp_path, data, tiny_model_dir):
    with pytest.raises(UserError, match="no checkpoint"):
        run(fast(data, tmp_path / "none", model=str(tiny_model_dir), resume=True))


def test_chat_messages_records_train(tiny, tiny_model_dir, tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
        {"instruction": "Name a colour.", "output": "Red."},
    ]
    # The default template (auto) picks chat because the file holds a conversation.
    stats = run(fast(write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "out", model=str(tiny_model_dir),
                     max_steps=1))
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["config"]["template"] == "chat"
    # One step sees both records; only the assistant answers (with end-of-turn) are trained.
    assert stats.trained_tokens == sum(encode_example(r, tiny[1], "chat", 512).num_trained_tokens for r in records)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_kernel_that_ignores_position_ids_is_detected(tiny):
    """packing_honoured must say False when records leak into each other, not only True."""
    import torch

    class PositionBlindDecoder(torch.nn.Module):
        """The real decoder, but run as one causal sequence: what a kernel ignoring position_ids does."""

        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.decoder(input_ids=input_ids, use_cache=use_cache)

    class PositionBlind(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.config = lm.config
            self.blind = PositionBlindDecoder(lm.get_decoder())

        def get_decoder(self):
            return self.blind

    assert packing_honoured(tiny[0], "cpu") is True
    assert packing_honoured(PositionBlind(tiny[0]), "cpu") is False


def test_one_accumulated_step_equals_one_full_batch(tiny):
    """grad-accum 2 over two micro-batches of unequal token counts updates exactly as one batch of all four."""
    import copy

    import torch
    from accelerate import Accelerator

    from pipeline.finetune import trained_tokens
    from pipeline.training import Trainer, train_step

    model, tok = tiny
    # Outputs of different lengths: a per-micro-batch mean would weight them wrongly.
    records = [RECORDS[0], RECORDS[1], {"instruction": "猫を英語で言うと？", "output": "猫は英語で cat です。とても短い答えです。"},
               RECORDS[4]]
    examples = [encode_example(r, tok, "alpaca", 512) for r in records]
    accelerator = Accelerator(cpu=True)

    def one_step(batches):
        lm = copy.deepcopy(model).train()
        module = make_loss_module(lm)
        # Plain SGD: its update is proportional to the gradient, so a mis-scaled accumulation shows
        # (Adam's first step is nearly sign(gradient) and would hide a factor of two).
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        trainer = Trainer(accelerator, module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
        done = train_step(trainer, batches, filler=lambda: None, units=trained_tokens, step=1)
        return done, {name: p.detach().clone() for name, p in lm.named_parameters()}

    pad = tok.pad_token_id
    assert examples[0].num_trained_tokens + examples[1].num_trained_tokens != \
        examples[2].num_trained_tokens + examples[3].num_trained_tokens
    accumulated, after_accumulated = one_step([collate([[0], [1]], examples, pad), collate([[2], [3]], examples, pad)])
    full, after_full = one_step([collate([[0], [1], [2], [3]], examples, pad)])
    assert accumulated.units == full.units == sum(e.num_trained_tokens for e in examples)
    assert accumulated.loss == pytest.approx(full.loss, rel=1e-5)
    changed = [name for name in after_full if not torch.equal(after_full[name], dict(model.named_parameters())[name])]
    assert changed, "the step changed the weights"
    for name in after_full:
        assert torch.allclose(after_accumulated[name], after_full[name], atol=1e-6), name


# ----------------------------------------------------------------------------- checkpoints and runaway losses

def test_a_fresh_run_refuses_old_checkpoints_and_overwrite_starts_afresh(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    cfg = fast(data, out, model=str(tiny_model_dir), max_steps=3, save_every=1, lr=1e-3)
    run(cfg)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000001", "step-000002"]
    with pytest.raises(UserError, match=r"--output-dir .*holds checkpoints of an earlier run \(last: step-000002\)"):
        run(dataclasses.replace(cfg, max_steps=2))
    # --overwrite removes the earlier run's checkpoints and metrics; the new run's are all there is.
    run(dataclasses.replace(cfg, max_steps=2, overwrite=True))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    state = json.loads((out / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["total_steps"] == 2 and state["settings"]["max_steps"] == 2 and len(state["settings"]["data_sha256"]) == 64
    with pytest.raises(UserError, match="--overwrite: not with --resume"):
        dataclasses.replace(cfg, resume=True, overwrite=True)


def test_resume_checks_the_checkpoint_settings_and_total_steps(tmp_path, data):
    from pipeline.finetune import resume_settings
    from pipeline.training import check_resume_state

    cfg = fast(data, tmp_path / "run", template="alpaca")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    settings = resume_settings(cfg)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "trained_tokens": 10, "total_steps": 4,
                                                               "settings": settings}))
    assert check_resume_state(checkpoint, settings, 4)["step"] == 2
    with pytest.raises(UserError, match="this run has 6 steps, the checkpoint's run 4"):
        check_resume_state(checkpoint, settings, 6)
    with pytest.raises(UserError, match="--batch-size differ"):
        check_resume_state(checkpoint, resume_settings(dataclasses.replace(cfg, batch_size=2)), 4)
    # The same file name with other records is another run's data.
    data.write_text(data.read_text(encoding="utf-8") + json.dumps({"instruction": "もう一つ", "output": "はい"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match="data_sha256 differ"):
        check_resume_state(checkpoint, resume_settings(cfg), 4)
    # A checkpoint that does not record its settings cannot be checked, so it is not resumed.
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "trained_tokens": 10}))
    with pytest.raises(UserError, match="records no settings"):
        check_resume_state(checkpoint, settings, 4)


def test_only_whole_step_digit_folders_are_checkpoints(tmp_path):
    from pipeline.training import checkpoints, partial_checkpoints, remove_partial_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("step-000010", "step-000002", "step-000011.tmp", "step-x", "step-3-old", "step-000004"):
        (root / name).mkdir(parents=True)
        if name != "step-000004":  # killed before its state was written
            (root / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000010"]
    assert [p.name for p in partial_checkpoints(tmp_path)] == ["step-000011.tmp"]
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000010", "step-3-old", "step-x"]


def test_a_loss_that_is_not_finite_stops_training_without_saving(tiny_model_dir, data, tmp_path, capsys):
    from safetensors.torch import load_file

    from pipeline.cli import main

    # 3e37 is a finite flag, but AdamW moves every weight by ~lr a step: after step 1 they are
    # huge (the normed forward still gives a finite loss), after step 2 infinite, so step 3's
    # loss is NaN.
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data), "--model", str(tiny_model_dir), "--output-dir", str(out), "--device", "cpu",
            "--val-fraction", "0", "--lr", "3e37", "--lr-schedule", "constant", "--max-steps", "3"]
    assert main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: training stopped at step 3: the loss is nan (not finite)")
    assert not (out / "model.safetensors").exists()
    # A checkpoint is refused as soon as the weights are not finite, even while the loss still is.
    assert main(argv + ["--save-every", "1", "--overwrite"]) == 2
    assert "training stopped after step 2: the weights are no longer finite" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert all(bool(t.isfinite().all()) for t in load_file(out / "checkpoints" / "step-000001" / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()
    # A rate whose step size does not even fit in a float32 is one line too, not a traceback.
    assert main(argv[:-2] + ["--lr", "1e39", "--max-steps", "2", "--overwrite"]) == 2
    assert "training stopped at step 1: the update does not fit in a float" in capsys.readouterr().err
    assert main(argv[:-2] + ["--lr", "inf", "--max-steps", "2"]) == 2  # a non-finite flag never starts
    assert "--lr" in capsys.readouterr().err


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_the_saved_model_is_prompted_as_it_was_trained(tiny_model_dir, data, tmp_path, template):
    """A server's chat endpoint renders one user turn with the saved chat_template; eval uses
    prompt_ids with the run's template: both give the ids training put before the answer."""
    from pipeline.models import load_tokenizer
    from pipeline.records import train_settings
    from pipeline.templates import prompt_ids

    out = tmp_path / template
    run(fast(data, out, model=str(tiny_model_dir), max_steps=1, template=template))
    saved = load_tokenizer(str(out))
    eval_template = train_settings(out)["template"]
    assert eval_template == template
    for record in (RECORDS[0], {"instruction": "「ありがとう」を英語にしてください。", "output": "Thank you."}):
        served = saved.apply_chat_template([{"role": "user", "content": record["instruction"]}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
        example = encode_example(record, saved, template, 512)
        assert served == prompt_ids(record, eval_template, saved) == example.input_ids[: example.num_prompt_tokens]
