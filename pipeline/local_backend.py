"""The `local` backend: the model in-process, generating with continuous batching.

    client = make_client(BackendOptions(backend="local", batch_size=16))   # pipeline.backends
    for response in client.stream(requests): ...

Up to `batch_size` sequences (one per choice of each request) are generated together by our own
decode loop over the model's forward pass (`DecodeBatch`). A sequence that ends (end token, stop
string, `max_tokens`) frees its slot at once and a waiting sequence is prefilled into it, so a
batch never waits on its longest answer while requests are waiting.

How rows share one KV cache: every row is left-padded to the cache's length, and a 2D attention
mask (1 = real token) with per-row position ids makes each row see only its own tokens, exactly
as `model.generate` does with left padding. Joining rows are prefilled together and written into
free slots (the whole cache is padded on the left first when a joiner is longer than it); when
nothing is waiting, finished rows are dropped from every tensor. The cache grows into
preallocated room (`_GrowingLayer`), so a decode step writes one column instead of copying the
whole cache as transformers' `DynamicLayer` does.

Greedy answers equal those of generating each request alone (tests/test_local_backend.py).
Sampling draws each choice's tokens from its own generator, seeded from the seed, the request's
place in the stream and the choice, so the same requests in the same order give the same texts
whatever else shares the batch.

Requests asking for `top_logprobs` (the judge's G-Eval scores) take one forward pass instead of
a generation (`_next_token`). Every answer names its engine and precision (`Response.engine`,
`Response.precision`) for the records' provenance.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.backends import BackendOptions, Request, Response, Totals, chat_messages

# Requests are pulled this many batches ahead and their rows sorted by prompt length, so rows
# prefilled together pad little, without pulling far ahead of a stage that builds prompts from
# its current state.
SORT_WINDOW_BATCHES = 4
# Positions the KV cache grows by when full: a few reallocations per answer instead of a copy
# of the whole cache per generated token.
CACHE_GROWTH = 128
# Leading cache columns that are padding in every row are cut once there are this many: each
# costs attention work every step, cutting costs one copy of the cache.
TRIM_COLUMNS = 64
ENGINE = f"torch-{'.'.join(torch.__version__.split('+')[0].split('.')[:2])} continuous-batching"
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class _Job:
    request: Request
    index: int  # place in the stream: seeds its sampling
    prompt: list[int]
    texts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    used: int = 0
    pending: int = 0  # choices not done yet


@dataclass
class _Row:
    """One sequence being generated: one choice of one request."""

    job: _Job
    choice: int
    generator: torch.Generator | None  # when sampling
    tokens: list[int] = field(default_factory=list)


class _GrowingLayer(DynamicLayer):
    """One layer's KV cache with room to grow: an update writes into preallocated space."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.keys_room, self.values_room, self.length = keys, values, length
        self.is_initialized, self.device = True, keys.device
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.keys_room[:, :, :self.length], self.values_room[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self.keys_room.shape[-2]:
            self.resize(self.length + new + CACHE_GROWTH, 0)
        self.keys_room[:, :, self.length:self.length + new] = key_states
        self.values_room[:, :, self.length:self.length + new] = value_states
        self.length += new
        self._views()
        return self.keys, self.values

    def resize(self, room: int, shift: int, rows: torch.Tensor | None = None) -> None:
        """New room of `room` positions; the cache moves right by `shift` (negative: its first
        columns are cut); `rows` keeps only those batch rows."""
        keys, values = (self.keys, self.values) if rows is None else (self.keys[rows], self.values[rows])
        start = max(0, -shift)
        shape = (keys.shape[0], keys.shape[1], room, keys.shape[3])
        self.keys_room = keys.new_zeros(shape)
        self.values_room = values.new_zeros(shape)
        self.length = self.length + shift
        self.keys_room[:, :, max(0, shift):self.length] = keys[:, :, start:]
        self.values_room[:, :, max(0, shift):self.length] = values[:, :, start:]
        self._views()
