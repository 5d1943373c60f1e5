"""bf16 weights with attention in fp32: the local backend's precision on CPUs with bf16 matmul units.

    lm = load_model(name, device="cpu", dtype="bf16"); use_fp32_attention(lm)

On a CPU with AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake) or AMX, bf16 matmuls run about 3x
faster than fp32 ones at decode sizes, but torch's CPU flash-attention kernel is slower in bf16
than in fp32 for a one-token query (1.4x on one thread, 4x at batch 1 on two, measured on Zen 4).
So the projections and MLPs run in bf16 while attention runs in fp32: queries, keys and values
are cast up (the local backend keeps its KV cache in fp32, so only the new token's query is
cast each step) and the output is cast back to bf16 for the output projection. Fed the same
answers, it picks fp32's next token at 98% of positions (bench/bench_local.py).

The function is registered with transformers' `AttentionInterface`, with the same mask
builder as `sdpa` (`AttentionMaskInterface`), so any model that supports `attn_implementation`
can use it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

FP32_ATTENTION = "sdpa_fp32"  # the attn_implementation name it is registered under


def sdpa_in_fp32(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """transformers' sdpa attention computed in fp32, its output in the query's dtype."""
    output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                             **kwargs)
    return output.to(query.dtype), weights


def use_fp32_attention(lm) -> bool:
    """Switch `lm` to attention in fp32; False when its architecture cannot switch attention."""
    AttentionInterface.register(FP32_ATTENTION, sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    try:
        lm.set_attn_implementation(FP32_ATTENTION)
    except (ValueError, NotImplementedError):
        return False
    return lm.config._attn_implementation == FP32_ATTENTION
