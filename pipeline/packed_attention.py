"""Attention for packed training rows on the CPU: each record attends causally to itself only,
one SDPA call per record, instead of one masked call over the whole row.

transformers isolates records packed in one row (their position_ids restart at 0, see
`pipeline.batching.collate`) by building a (rows, 1, L, L) mask and running SDPA with it: the
kernel then scores every query against every key of the row and masks most of it away (a
512-token row of ~7 records throws ~85% of the scores away), and a masked call cannot skip the
upper triangle as the causal kernel does. Cutting the row at the records' starts and running
each span with `is_causal` computes only the scores that count and builds no mask; on 2 CPU
cores attention forward + backward over such a row took 212 ms a layer against 404 ms masked.
The result is the same up to float rounding (tests/test_finetune.py compares packed losses).

Under bf16 autocast the scores are computed in fp32 (queries, keys and values cast up, the output
cast back): torch's CPU flash-attention kernel runs forward + backward over a packed row's
records about 2x slower in bf16 than in fp32 on a Zen 4 CPU with AVX-512 BF16, while the
projections around it gain ~3x from bf16. fp32 scores are also the more exact ones. For that
reason `finetune` uses this attention for unpacked training on the CPU too (each row one record).

Only training forwards take the per-record path. Whenever a mask is given (generation with
padding, the explicit 4-D block mask of `collate(block_mask=True)`) or the queries are not the
keys (decoding with a KV cache), it is transformers' own SDPA, unchanged. On a GPU the masked
kernel (or flash attention's varlen path) is left alone: many small launches would cost more.
"""

from __future__ import annotations

ATTENTION = "packed_sdpa"  # the name the model's config carries while it trains packed


def record_spans(positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each record in one row: a record starts where its position is 0.

    Padding continues the last record's positions, so it stays in the last span, after every
    real token (causality already hides it from them)."""
    starts = [i for i, p in enumerate(positions) if p == 0 and i > 0]
    bounds = [0, *starts, len(positions)]
    return list(zip(bounds[:-1], bounds[1:]))


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention interface: query/key/value (rows, heads, L, dim) -> ((rows, L, heads, dim), None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    if dtype != torch.float32:  # bf16 autocast: the CPU kernel is ~2x faster in fp32 (module docstring)
        query, key, value = query.float(), key.float(), value.float()
    spans = [record_spans(row) for row in position_ids.expand(query.shape[0], -1).tolist()]
    if all(len(row) == 1 for row in spans):  # nothing packed: the plain causal call over the batch
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)[0].to(dtype), None
    rows = []
    for r, row in enumerate(spans):
        pieces = [sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
                                         None, is_causal=True, **kwargs)[0] for a, b in row]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0).to(dtype), None


def packed_mask(*args, attention_mask=None, **kwargs):
    """No mask for a training forward (the spans come from position_ids); SDPA's own mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_packed_attention(model) -> bool:
    """Switch a model that uses SDPA to `packed_sdpa`; False (and left alone) for any other attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation not in ("sdpa", ATTENTION):
        return False
    AttentionInterface.register(ATTENTION, packed_sdpa)
    AttentionMaskInterface.register(ATTENTION, packed_mask)
    base.set_attn_implementation(ATTENTION)
    return True


def restore_attention(model) -> None:
    """Back to SDPA (before saving: a saved config must name an attention every loader knows)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == ATTENTION:
        base.set_attn_implementation("sdpa")
