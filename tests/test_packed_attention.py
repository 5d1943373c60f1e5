"""Per-record attention for packed rows (pipeline.packed_attention): same numbers, no row-wide mask."""

from __future__ import annotations

import pytest

from pipeline.batching import collate
from pipeline.finetune import make_loss_module
from pipeline.packed_attention import ATTENTION, record_spans, restore_attention, use_packed_attention
from pipeline.templates import encode_example

RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "日本の首都はどこですか。", "output": "東京です。"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "「ありがとう」を英語にしてください。", "output": "Thank you."},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
]


def test_record_spans_start_where_positions_restart_and_padding_stays_in_the_last():
    assert record_spans([0, 1, 2, 0, 1, 0, 1, 2, 3]) == [(0, 3), (3, 5), (5, 9)]
    assert record_spans([0, 1, 2, 3]) == [(0, 4)]
    # A padded row: positions run on after the last record, so the pads join its span.
    assert record_spans([0, 1, 0, 1, 2, 3, 4]) == [(0, 2), (2, 7)]


@pytest.fixture
def tiny_pair(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def loss_and_grads(model, batch):
    loss_sum, _, n = make_loss_module(model)(**{k: v for k, v in batch.items() if k != "real_tokens"})
    model.zero_grad()
    loss_sum.backward()
    return float(loss_sum.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_give_the_masked_kernels_loss_and_gradients(tiny_pair):
    import torch

    model, tok = tiny_pair
    examples = [encode_example(r, tok, "alpaca", 512) for r in RECORDS]
    batch = collate([[0, 1, 2], [3, 4]], examples, tok.pad_token_id)
    masked_loss, masked_n, masked_grads = loss_and_grads(model, batch)
    assert use_packed_attention(model) and model.config._attn_implementation == ATTENTION
    loss, n, grads = loss_and_grads(model, batch)
    assert n == masked_n and loss == pytest.approx(masked_loss, rel=1e-5)
    for name, grad in masked_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name
    # And each record alone (plain causal attention) sums to the same loss: records stay isolated.
    restore_attention(model)
    alone = sum(loss_and_grads(model, collate([[i]], examples, tok.pad_token_id))[0] for i in range(len(RECORDS)))
    assert loss == pytest.approx(alone, rel=1e-5)


def test_no_row_wide_mask_and_no_query_longer_than_a_record(tiny_pair, monkeypatch):
    import torch
    import torch.nn.functional as F

    model, tok = tiny_pair
    examples = [encode_example(r, tok, "alpaca", 512) for r in RECORDS]
    batch = collate([[0, 1, 2], [3, 4]], examples, tok.pad_token_id)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append((attn_mask is not None, query.shape[-2]))
        return real(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    use_packed_attention(model)
    loss_and_grads(model, batch)
    assert seen, "the attention never ran through SDPA"
    assert not any(masked for masked, _ in seen)
    # The widest call is one record plus the row's padding, never the whole row of records.
    assert max(length for _, length in seen) < batch["input_ids"].shape[1]


def test_under_bf16_autocast_scores_are_fp32_and_records_stay_isolated(tiny_pair, monkeypatch):
    import torch
    import torch.nn.functional as F

    model, tok = tiny_pair
    examples = [encode_example(r, tok, "alpaca", 512) for r in RECORDS]
    batch = collate([[0, 1, 2], [3, 4]], examples, tok.pad_token_id)
    fp32_loss, _, _ = loss_and_grads(model, batch)
    use_packed_attention(model)
    dtypes = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, **kw):
        dtypes.append(query.dtype)
        return real(query, key, value, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _, grads = loss_and_grads(model, batch)
        alone = sum(loss_and_grads(model, collate([[i]], examples, tok.pad_token_id))[0] for i in range(len(RECORDS)))
    assert dtypes and set(dtypes) == {torch.float32}  # the kernel ran in fp32, inside bf16 autocast
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert packed == pytest.approx(alone, rel=1e-3)
    assert packed == pytest.approx(fp32_loss, rel=2e-2)  # bf16 projections round at ~3 significant digits
    # Isolation, token by token: the second record's hidden states packed behind the first are
    # those it gets alone; with positions running on (no isolation) they are far off.
    decoder, first, second = model.get_decoder(), len(examples[0].input_ids), len(examples[1].input_ids)
    row, single = collate([[0, 1]], examples, tok.pad_token_id), collate([[1]], examples, tok.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        def hidden(b, positions):
            return decoder(input_ids=b["input_ids"], position_ids=positions).last_hidden_state.float()
        packed_hidden = hidden(row, row["position_ids"])[0, first:first + second]
        leaky_hidden = hidden(row, torch.arange(first + second)[None])[0, first:first + second]
        alone_hidden = hidden(single, single["position_ids"])[0]
    assert (packed_hidden - alone_hidden).abs().max() < 1e-2
    assert (leaky_hidden - alone_hidden).abs().max() > 1e-1


def test_generation_with_left_padding_is_unchanged(tiny_pair):
    import torch

    model, tok = tiny_pair
    model.eval()
    enc = tok(["Name a colour.", "日本の首都は"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = model.generate(**enc, max_new_tokens=6, do_sample=False)
        use_packed_attention(model)
        packed = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, packed)


def test_other_attention_kernels_are_left_alone(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "eager"


def test_finetune_packed_on_cpu_trains_with_per_record_attention(tiny_model_dir, tmp_path):
    from pipeline.finetune import Config, load_training_records, prepare
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cfg = Config(data=str(data), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir), template="alpaca",
                 packing=True, val_fraction=0.0, device="cpu", seed=0)
    s = prepare(cfg, load_training_records(cfg.data, cfg.template), tmp_path / "out", None)
    lm = s.trainer.accelerator.unwrap_model(s.trainer.module).lm
    assert lm.config._attn_implementation == ATTENTION
    assert s.packing_mode == "per-record position_ids"  # the probe passed: no fallback to the 4-D mask
