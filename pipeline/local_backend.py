"""The `local` backend: the model in-process, generating with continuous batching.

    client = make_client(BackendOptions(backend="local", batch_size=16))   # pipeline.backends
    for response in client.stream(requests): ...

Up to `batch_size` sequences (one per choice of each request) are generated together by our own
decode loop over the model's forward pass (`DecodeBatch`). A sequence that ends (end token, stop
string, `max_tokens`) frees its slot at once and a waiting sequence is prefilled into it, so a
batch never waits on its longest answer while requests are waiting.

How rows share one KV cache: every row is left-padded to the cache's length, and a 2D attention
mask (1 = real token) with per-row position ids makes each row see only its own tokens, exactly
as `model.generate` does with left padding. Joining rows are prefilled in groups of similar
length within a padded-token budget (`batching.length_groups`) and written into free slots (the
whole cache is padded on the left first when a joiner is longer than it); when nothing is
waiting, finished rows are dropped from every tensor. The cache grows into
preallocated room (`_GrowingLayer`), so a decode step writes one column instead of copying the
whole cache as transformers' `DynamicLayer` does.

Greedy answers equal those of generating each request alone (tests/test_local_backend.py).
Sampling draws each choice's tokens from its own generator, seeded from the seed, the request's
place in the stream and the choice, so the same requests in the same order give the same texts
whatever else shares the batch.

Requests asking for `top_logprobs` (the judge's G-Eval scores) take one forward pass instead of
a generation (`_next_token`), in the same length groups: 32 English and Japanese judge prompts
took 73.5 s in padded batches of 16 on 2 cores and 17.6 s in groups (bench/bench_batches.py).
Sampling draws from the top-p set found among the 256 most likely tokens when they hold `top_p`
(`nucleus`; 19.5x a whole-vocabulary sort per token). Every answer names its engine and
precision (`Response.engine`, `Response.precision`) for the records' provenance.

Precision (`models.local_dtype`): on a CPU with bf16 matmul units (AVX-512 BF16 or AMX), bf16;
fp32 on other CPUs. `LocalClient(dtype=...)` picks one explicitly, including bf16 weights with
attention and the KV cache in fp32 (pipeline/cpu_attention.py), named "bf16 (fp32 attention)":
as close to fp32 as plain bf16 here and 11% slower, it is kept for CPUs whose bf16 attention
kernel is slow (bench/bench_local.py measures all three).
The tests pin fp32 where batched greedy answers must equal each request's answer alone: bf16
rounds at 8 bits, so a batch's shape can flip a near tie.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.backends import BackendOptions, Request, Response, Totals, chat_messages
from pipeline.batching import length_groups, token_budget

# Requests are pulled this many batches ahead and their rows sorted by prompt length, so rows
# prefilled together pad little, without pulling far ahead of a stage that builds prompts from
# its current state.
SORT_WINDOW_BATCHES = 4
# Positions the KV cache grows by when full: a few reallocations per answer instead of a copy
# of the whole cache per generated token.
CACHE_GROWTH = 128
# Tokens `nucleus` looks among before sorting the whole vocabulary: a sampled answer's top-p
# set is rarely wider.
NUCLEUS_PEEK = 256
# Leading cache columns that are padding in every row are cut once there are this many: each
# costs attention work every step, cutting costs one copy of the cache.
TRIM_COLUMNS = 64
# Joiners' prompts that start with this many tokens in common (a chat template's system prompt:
# 21 tokens for SmolLM2) prefill that start once, not once per row.
MIN_SHARED_PREFIX = 16
ENGINE = f"torch-{'.'.join(torch.__version__.split('+')[0].split('.')[:2])} continuous-batching"
# How provenance names bf16 weights with fp32 attention (models.BF16_FP32_ATTENTION).
BF16_FP32_ATTENTION_NAME = "bf16 (fp32 attention)"


@dataclass(eq=False)
class _Job:
    request: Request
    index: int  # place in the stream: seeds its sampling
    prompt: list[int]
    texts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    used: int = 0
    pending: int = 0  # choices not done yet


@dataclass(eq=False)
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


class DecodeBatch:
    """The rows being generated and their shared, left-padded KV cache.

    `rows[i]` is the sequence in slot i (None once it is done and until a joiner takes the slot);
    `mask[i]` marks slot i's real cache positions.
    """

    def __init__(self, lm, pad_id: int, cache_dtype: torch.dtype | None = None):
        self.lm, self.pad_id = lm, pad_id
        # fp32 under fp32 attention: the cache is then cast once when written, not every step when read.
        self.cache_dtype = cache_dtype or lm.dtype
        self.prefix: list[int] = []  # the prompts' shared start, and its KV cache per layer
        self.prefix_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: list[_Row | None] = []
        self.layers: list[_GrowingLayer] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long)

    @property
    def live(self) -> int:
        return sum(row is not None for row in self.rows)

    def join(self, rows: list[_Row]) -> torch.Tensor:
        """Prefill `rows` (left-padded together, after the prompts' shared start when there is one)
        into free slots; their first tokens' logits."""
        prefix = self._shared_prefix(rows)
        width = max(len(row.job.prompt) for row in rows) - len(prefix)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            suffix = row.job.prompt[len(prefix):]
            ids[j, width - len(suffix):] = torch.tensor(suffix)
            mask[j, width - len(suffix):] = 1
        # The shared start sits before each row's padding: a hole the mask hides, positions skip.
        mask = torch.cat([mask.new_ones((len(rows), len(prefix))), mask], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, len(prefix):]
        cache = self._prefix_layers(len(rows), len(prefix), width) if prefix else None
        device = self.lm.device
        out = self.lm(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                      cache=cache, use_cache=True, logits_to_keep=1)
        # Padding positions hold whatever the model computed for a token that sees nothing;
        # zeros keep them harmless in every later step (they are masked, but NaN * 0 is NaN).
        pad = (mask == 0).to(device)[:, None, :, None]
        new = [(layer.keys.masked_fill(pad, 0).to(self.cache_dtype), layer.values.masked_fill(pad, 0).to(self.cache_dtype))
               for layer in out.cache.layers]
        self._place(rows, new, mask)
        return out.logits[:, -1, :].float()  # argmax over bf16 logits is several times slower

    def _shared_prefix(self, rows: list[_Row]) -> list[int]:
        """The start all `rows`' prompts share (a chat template's system prompt), whose KV cache is
        computed once and kept for later joiners; [] when it is too short to pay."""
        prompts = [row.job.prompt for row in rows]
        shortest = min(len(prompt) for prompt in prompts) - 1  # each row prefills at least its last token
        kept = self.prefix[:shortest]
        if len(kept) >= MIN_SHARED_PREFIX and len(kept) == len(self.prefix) and all(p[:len(kept)] == kept for p in prompts):
            return kept
        common = list(itertools.takewhile(lambda ids: len(set(ids)) == 1, zip(*(p[:shortest] for p in prompts))))
        if len(common) < MIN_SHARED_PREFIX or len(prompts) < 2:
            return []
        self.prefix = [ids[0] for ids in common]
        out = self.lm(input_ids=torch.tensor([self.prefix], device=self.lm.device), use_cache=True, logits_to_keep=1)
        self.prefix_cache = [(layer.keys.to(self.cache_dtype), layer.values.to(self.cache_dtype))
                             for layer in out.cache.layers]
        return self.prefix

    def _prefix_layers(self, rows: int, length: int, width: int) -> Cache:
        """A cache holding the first `length` positions of the shared start for `rows` rows, with
        room for `width` more: the prefill writes into it without reallocating."""
        layers = []
        for keys, values in self.prefix_cache:
            shape = (rows, keys.shape[1], length + width, keys.shape[3])
            keys_room, values_room = keys.new_empty(shape), values.new_empty(shape)
            keys_room[:, :, :length], values_room[:, :, :length] = keys[:, :, :length], values[:, :, :length]
            layers.append(_GrowingLayer(keys_room, values_room, length))
        return Cache(layers=layers)

    def _place(self, rows: list[_Row], new: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        width = mask.shape[1]
        if not self.layers:
            self.layers = [_GrowingLayer(keys, values, width) for keys, values in new]
            for layer in self.layers:
                layer.resize(width + CACHE_GROWTH, 0)
            self.rows, self.mask = list(rows), mask
            return
        length = self.layers[0].length
        if width > length:  # the joiner is longer than the cache: pad every row on the left
            for layer in self.layers:
                layer.resize(width + CACHE_GROWTH, width - length)
            self.mask = torch.cat([self.mask.new_zeros((len(self.rows), width - length)), self.mask], dim=1)
            length = width
        free = [i for i, row in enumerate(self.rows) if row is None]
        if len(free) < len(rows):
            self._add_slots(len(rows) - len(free))
            free = [i for i, row in enumerate(self.rows) if row is None]
        slots = torch.tensor(free[:len(rows)])
        for layer, (keys, values) in zip(self.layers, new):
            layer.keys_room[slots, :, :length - width] = 0
            layer.values_room[slots, :, :length - width] = 0
            layer.keys_room[slots, :, length - width:length] = keys
            layer.values_room[slots, :, length - width:length] = values
            layer._views()
        self.mask[slots] = torch.cat([mask.new_zeros((len(rows), length - width)), mask], dim=1)
        for slot, row in zip(slots.tolist(), rows):
            self.rows[slot] = row

    def _add_slots(self, count: int) -> None:
        for layer in self.layers:
            extra = (count,) + tuple(layer.keys_room.shape[1:])
            layer.keys_room = torch.cat([layer.keys_room, layer.keys_room.new_zeros(extra)])
            layer.values_room = torch.cat([layer.values_room, layer.values_room.new_zeros(extra)])
            layer._views()
        self.mask = torch.cat([self.mask, self.mask.new_zeros((count, self.mask.shape[1]))])
        self.rows += [None] * count

    def compact(self) -> None:
        """Drop the empty slots, and the leading columns that are padding in every row once they are many."""
        keep = [i for i, row in enumerate(self.rows) if row is not None]
        if not keep:
            self.rows, self.layers, self.mask = [], [], self.mask[:0, :0]
            return
        real = self.mask[keep].sum(dim=0).nonzero()
        cut = int(real[0]) if len(real) else 0
        if len(keep) == len(self.rows) and cut < TRIM_COLUMNS:
            return
        index = torch.tensor(keep)
        for layer in self.layers:
            layer.resize(layer.length - cut + CACHE_GROWTH, -cut, rows=index)
        self.mask = self.mask[index, cut:]
        self.rows = [self.rows[i] for i in keep]

    def step(self) -> torch.Tensor:
        """One decode step: feeds each row its last token; the next tokens' logits [rows, vocab]."""
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows])
        positions = self.mask.sum(dim=1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        device = self.lm.device
        out = self.lm(input_ids=ids.to(device), attention_mask=self.mask.to(device), position_ids=positions.to(device),
                      cache=Cache(layers=self.layers), use_cache=True)
        return out.logits[:, -1, :].float()


class LocalClient:
    """`transformers` models in-process, generated with `DecodeBatch` (see the module docstring)."""

    backend = "local"

    def __init__(self, options: BackendOptions, dtype: str = "auto"):
        from pipeline.cpu_attention import use_fp32_attention
        from pipeline.models import (BF16_FP32_ATTENTION, load_model, load_tokenizer, local_dtype, precision_name,
                                     use_free_cores)

        self.options = options
        self.model = options.model
        self.api = options.api
        self.totals = Totals()
        self.threads = use_free_cores()
        self.tokenizer = load_tokenizer(options.model, padding_side="left")
        precision = local_dtype(options.device, dtype)
        self.lm = load_model(options.model, device=options.device, dtype=precision)
        self.precision = precision_name(self.lm.dtype)
        self.cache_dtype = self.lm.dtype
        if precision == BF16_FP32_ATTENTION and use_fp32_attention(self.lm):
            self.precision, self.cache_dtype = BF16_FP32_ATTENTION_NAME, torch.float32
        self.engine = ENGINE
        eos = self.lm.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # The pad token ends a row too, as it did when rows were right-padded by generate().
        self._eos |= {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        self._pulled = 0
        # What an empty prompt starts from (`_prompt_ids`): the model sees at least one token.
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        self._empty_prompt = [start] if start is not None else [self.tokenizer.pad_token_id]

    def stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        source = iter(requests)
        waiting: deque[_Row] = deque()
        scored: list[tuple[Request, str, bool]] = []
        batch = DecodeBatch(self.lm, self.tokenizer.pad_token_id, self.cache_dtype)
        exhausted = False
        while True:
            if not exhausted and len(waiting) < self.options.batch_size:
                exhausted = self._pull(source, waiting, scored)
            size = self.options.batch_size
            while scored and (len(scored) >= size or exhausted):
                yield from self._count(self._next_token(scored[:size]))
                del scored[:size]
            if not waiting and not batch.live:
                if exhausted:
                    return
                continue
            with torch.inference_mode():
                responses = self._fill(batch, waiting)
                if batch.live:
                    batch.compact()  # slots still free: nothing is waiting for them
                    responses += self._advance(batch, batch.rows, batch.step())
            yield from self._count(responses)

    def close(self) -> None:
        self.lm = None

    def _count(self, responses: list[Response]) -> Iterator[Response]:
        for response in responses:
            self.totals.add(response)
            yield response

    def _pull(self, source: Iterator[Request], waiting: deque, scored: list) -> bool:
        """Pull the next window of requests: rows to generate (sorted by prompt length) or to
        score; True once the source is exhausted."""
        window = self.options.batch_size * SORT_WINDOW_BATCHES
        pulled = list(itertools.islice(source, window))
        rows = []
        for request in pulled:
            text, templated = self._render(request)
            self._pulled += 1
            if request.top_logprobs:
                scored.append((request, text, templated))
                continue
            [prompt] = self._prompt_ids([text], templated)
            job = _Job(request, self._pulled, prompt, texts=[""] * request.n, reasons=[""] * request.n,
                       pending=request.n)
            rows += [_Row(job, choice, self._generator(request, job.index, choice)) for choice in range(request.n)]
        rows.sort(key=lambda row: len(row.job.prompt))
        waiting.extend(rows)
        return len(pulled) < window

    def _generator(self, request: Request, index: int, choice: int) -> torch.Generator | None:
        if request.temperature <= 0:
            return None
        seed = request.seed if request.seed is not None else self.options.seed
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            digest = hashlib.sha256(f"{seed}:{index}:{choice}".encode()).digest()
            generator.manual_seed(int.from_bytes(digest[:8], "little"))
        return generator

    def _fill(self, batch: DecodeBatch, waiting: deque[_Row]) -> list[Response]:
        """Prefill waiting rows into the free slots until the batch is full or nothing waits, in
        groups of similar prompt length (`batching.length_groups`): prefilled together, a short
        prompt would be padded to the longest."""
        responses = []
        while waiting and batch.live < self.options.batch_size:
            joiners = [waiting.popleft() for _ in range(min(self.options.batch_size - batch.live, len(waiting)))]
            lengths = [len(row.job.prompt) for row in joiners]
            for group in length_groups(lengths, token_budget(self.lm.device), len(joiners)):
                rows = [joiners[i] for i in group]
                responses += self._advance(batch, rows, batch.join(rows))
        return responses

    def _advance(self, batch: DecodeBatch, rows: list[_Row], logits: torch.Tensor) -> list[Response]:
        """Give each of `rows` (all in `batch`) its next token; a row that ends leaves its slot.
        Returns the answers of the requests now complete."""
        responses = []
        for row, token in zip(list(rows), self._choose(rows, logits)):
            row.tokens.append(token)
            done = self._done(row)
            if done is None:
                continue
            batch.rows[batch.rows.index(row)] = None
            job = row.job
            job.texts[row.choice], job.reasons[row.choice] = done[0], done[1]
            job.used += done[2]
            job.pending -= 1
            if not job.pending:
                responses.append(Response(request=job.request, texts=job.texts, finish_reasons=job.reasons,
                                          prompt_tokens=len(job.prompt), completion_tokens=job.used,
                                          request_id=f"local-{job.request.key}", model=self.model,
                                          backend=self.backend, engine=self.engine, precision=self.precision))
        return responses

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token: the most likely one (greedy), or drawn from its own generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.generator is not None:
                tokens[i] = _sample(logits[i], row.job.request, row.generator)
        return tokens

    def _done(self, row: _Row) -> tuple[str, str, int] | None:
        """Text, finish_reason and token count once the row has ended; None while it goes on."""
        request = row.job.request
        token = row.tokens[-1]
        if token in self._eos:
            return self._finish(row.tokens[:-1], request, "stop", len(row.tokens))
        if request.stop or len(row.tokens) >= request.max_tokens:
            # A stop string counts only in the completion, never across the end of the prompt
            # (a chat prompt ends in a newline), as the OpenAI API means `stop`.
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            if any(s and s in text for s in request.stop or ()):
                return self._finish(row.tokens, request, "stop", len(row.tokens))
            if len(row.tokens) >= request.max_tokens:
                return self._finish(row.tokens, request, "length", len(row.tokens))
        return None

    def _finish(self, kept: list[int], request: Request, reason: str, count: int) -> tuple[str, str, int]:
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cuts = [text.find(s) for s in request.stop or () if s and s in text]
        return (text[:min(cuts)], "stop", count) if cuts else (text, reason, count)

    def _prompt_ids(self, texts: list[str], templated: bool) -> list[list[int]]:
        """Each prompt's token ids (special tokens only where the template has not put them); an
        empty prompt starts from the start token, as `model.generate` does."""
        return [ids or self._empty_prompt for ids in self.tokenizer(texts, add_special_tokens=not templated)["input_ids"]]

    def _render(self, request: Request) -> tuple[str, bool]:
        """The text to generate from, and whether it already holds the special tokens."""
        if request.messages and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
            return text, True
        if request.prompt is not None:
            return request.prompt, False
        return "\n\n".join(str(m["content"]) for m in chat_messages(request)), False

    def _next_token(self, batch: list[tuple[Request, str, bool]]) -> list[Response]:
        """One forward pass instead of a generation: the first answer token's log-probabilities.

        Each row's top `top_logprobs` tokens plus its `logprob_tokens`; the text is the most
        likely of them, as a one-token greedy answer would be. Rows go in groups of similar
        length (`batching.length_groups`: a 400-token English judge prompt is not padded to a
        1,000-token Japanese one), left-padded so every row's next token is at the last
        position. Rows whose prompts differ in `templated` are encoded apart, since one takes
        the special tokens and the other not.
        """
        responses = []
        for templated in (True, False):
            part = [item for item in batch if item[2] == templated]
            if not part:
                continue
            ids = self._prompt_ids([text for _, text, _ in part], templated)
            for group in length_groups([len(row) for row in ids], token_budget(self.lm.device), len(part)):
                encoded = self.tokenizer.pad({"input_ids": [ids[i] for i in group]}, return_tensors="pt",
                                             padding_side="left").to(self.lm.device)
                responses += self._score([part[i] for i in group], encoded)
        return responses

    def _score(self, batch: list[tuple[Request, str, bool]], encoded) -> list[Response]:
        with torch.inference_mode():
            # Only the last position's logits: the full [batch, length, vocab] tensor of an
            # 800-token Japanese judge prompt would be over a gigabyte per batch of 8.
            logits = self.lm(**encoded, logits_to_keep=1).logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
        responses = []
        for i, (request, _, _) in enumerate(batch):
            top = torch.topk(logprobs[i], request.top_logprobs)
            ids = dict(zip(top.indices.tolist(), top.values.tolist()))
            for token in request.logprob_tokens:
                token_ids = self.tokenizer.encode(token, add_special_tokens=False)
                if token_ids:  # a multi-token string is scored by its first token
                    ids.setdefault(token_ids[0], logprobs[i, token_ids[0]].item())
            alternatives: dict[str, float] = {}
            for token_id, logprob in ids.items():  # two ids can decode to one string: add their probabilities
                text = self.tokenizer.decode([token_id])
                alternatives[text] = float(np.logaddexp(alternatives[text], logprob)) if text in alternatives else logprob
            best = max(alternatives, key=alternatives.get)
            responses.append(Response(request=request, texts=[best], finish_reasons=["length"],
                                      prompt_tokens=int(prompt_tokens[i]), completion_tokens=1,
                                      request_id=f"local-{request.key}", model=self.model, backend=self.backend,
                                      top_logprobs=[alternatives], engine=self.engine, precision=self.precision))
        return responses


def _sample(logits: torch.Tensor, request: Request, generator: torch.Generator) -> int:
    """A token drawn at `request.temperature` from the smallest set of tokens holding `top_p` of the probability."""
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    ids = None
    if request.top_p < 1.0:
        probs, ids = nucleus(probs, request.top_p)
    # Inverse transform sampling: torch.multinomial over a 49,152-token vocabulary took ~1 ms a token.
    cumulative = probs.cumsum(dim=0)
    drawn = torch.rand((), generator=generator) * cumulative[-1]
    choice = min(int(torch.searchsorted(cumulative, drawn, right=True)), len(cumulative) - 1)
    return int(ids[choice]) if ids is not None else choice


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens holding `top_p` of the probability, most likely first:
    `(their probabilities, their ids)`. A token is kept while the probability before it is under
    `top_p` (the first always is).

    The top `NUCLEUS_PEEK` are looked at first: when they hold `top_p`, the set lies among them,
    and sorting the whole vocabulary (2.5 ms a token here, a third of `generate`'s time) is skipped.
    """
    top, ids = torch.topk(probs, min(NUCLEUS_PEEK, len(probs)))
    if len(top) < len(probs) and float(top.sum()) < top_p:
        top, ids = torch.sort(probs, descending=True)
    keep = (top.cumsum(dim=0) - top) < top_p
    return top[keep], ids[keep]
