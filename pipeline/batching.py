"""Batches of tokenized records: for training, the split, packing, length grouping and padding;
for inference, `length_groups` (padded forward passes that stay small).

`finetune` plans and collates its micro-batches here; a preference stage can too. Nothing here
knows about a loss: a batch is `input_ids`, `labels` (IGNORE_INDEX where nothing is trained),
`position_ids` that restart at 0 for each record (packing isolation), the count of real tokens,
and with `block_mask` an explicit 4-D attention mask.
"""

from __future__ import annotations

import random
import sys

from pipeline.errors import UserError
from pipeline.templates import IGNORE_INDEX, EncodedExample, encode_example

# Length-grouped batching sorts records by length inside windows of this many batches, so a
# batch holds similar lengths (little padding) while the order still varies between epochs.
LENGTH_GROUP_BATCHES = 64
# Seeds of different epochs must give unrelated orders: mix the epoch in with a large prime.
EPOCH_SEED_PRIME = 1_000_003
# Packing self-check: two probe records of these lengths must give the same hidden states
# packed in one row as run alone, else the kernel ignores position_ids for isolation.
PROBE_LENGTHS = (7, 5)
PROBE_TOLERANCE = 1e-3  # fp32 differences from summation order are ~1e-6; leakage is ~1e-1
# Padded tokens (rows x longest) in one inference forward pass on a CPU. Padding, and attention
# over it, is what a padded batch costs there; an equal-length batch costs no more than its rows
# one by one. On 2 cores, 16 judge prompts of 400-1,000 tokens (English and Japanese) took 21 s
# as one batch, 9 s in length groups of at most 2,048 tokens, 10 s of 4,096, 14 s of 8,192
# (bench/bench_batches.py compares 2,048 with padded batches of 16).
CPU_TOKEN_BUDGET = 2048
# Elsewhere (a GPU) wide batches pay; this only keeps one pass's activations bounded (unmeasured:
# no GPU was at hand).
ACCELERATOR_TOKEN_BUDGET = 65_536


def token_budget(device) -> int:
    """Padded tokens per inference forward pass on `device` (a torch.device or its type name)."""
    return CPU_TOKEN_BUDGET if str(getattr(device, "type", device)) == "cpu" else ACCELERATOR_TOKEN_BUDGET


def length_groups(lengths: list[int], budget: int, max_rows: int) -> list[list[int]]:
    """Indices of `lengths`, longest first, cut into groups of at most `max_rows` whose padded size
    (rows x the group's longest) stays within `budget` tokens; one longer than that goes alone."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current and (len(current) == max_rows or (len(current) + 1) * lengths[current[0]] > budget):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random hold-out; at least one validation record when a fraction is asked and there are two."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(records) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [records[i] for i in train], [records[i] for i in val]


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of examples grouped into rows of at most max_length tokens.

    Hand-written rather than a library call because the rows must respect record boundaries
    (no record split across rows) and the data is small enough that O(n log n) plus a scan of
    open rows is instant; TRL's BFD packer lives inside its trainer, not as a public function.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


def plan_batches(examples: list[EncodedExample], batch_size: int, packing: bool, max_length: int,
                 seed: int, epoch: int) -> list[list[list[int]]]:
    """One epoch's micro-batches: each a list of rows, each row a list of example indices.

    Without packing every row is one example and batches are grouped by length (sorted inside
    windows of LENGTH_GROUP_BATCHES batches, then the batches shuffled), so padding is small.
    """
    rng = random.Random(seed * EPOCH_SEED_PRIME + epoch)
    lengths = [len(e.input_ids) for e in examples]
    if packing:
        rows = pack_rows(lengths, max_length)
        rng.shuffle(rows)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [[[i] for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[list[int]], examples: list[EncodedExample], pad_id: int, block_mask: bool = False):
    """Tensors for one micro-batch, padded to its longest row (not to max length).

    Each record's position_ids restart at 0: transformers reads the resets as record
    boundaries and builds a block-diagonal causal mask (or varlen flash attention). Padding
    continues the last record's positions, so an unpacked row is one plain causal sequence;
    pad tokens come after every real token, so causality already hides them, and their
    labels are IGNORE_INDEX. With `block_mask` an explicit additive 4-D mask is built too,
    for kernels that do not honour position_ids.
    """
    import torch

    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)
    real_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            n = len(examples[i].input_ids)
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids)
            labels[r, at:at + n] = torch.tensor(examples[i].labels)
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            at += n
        real_tokens += at
        if at < width:
            start = positions[r, at - 1] + 1 if at else 0
            positions[r, at:] = torch.arange(start, start + width - at)
            segment[r, at:] = max(len(row) - 1, 0)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "real_tokens": real_tokens}
    if block_mask:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = segment[:, :, None] == segment[:, None, :]
        allowed = (same & causal)[:, None]
        batch["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return batch


def encode_all(records: list[dict], tokenizer, template: str, max_length: int) -> list[EncodedExample]:
    from tqdm import tqdm

    out = []
    for record in tqdm(records, desc="tokenizing", unit="rec", disable=len(records) < 1000, file=sys.stderr):
        try:
            out.append(encode_example(record, tokenizer, template, max_length))
        except ValueError as e:
            raise UserError(f"--template {template}: {e}") from None
    return out



def micro_batch_filler(examples: list[EncodedExample]) -> list[list[int]]:
    """A one-row batch (the shortest example), run with weight 0 by a process whose share ran out."""
    return [[min(range(len(examples)), key=lambda i: len(examples[i].input_ids))]]


def packing_honoured(lm, device) -> bool:
    """Do per-record position_ids isolate records in this model's attention kernel?"""
    import torch

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, base.config.vocab_size, (1, n), generator=gen).to(device) for n in PROBE_LENGTHS)
    decoder = base.get_decoder()
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        def run(ids, pos):
            return decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state.float()
        packed = run(torch.cat([a, b], 1), torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None].to(device))
        alone = run(b, torch.arange(b.shape[1])[None].to(device))
    decoder.train(was_training)
    return bool((packed[:, a.shape[1]:] - alone).abs().max() < PROBE_TOLERANCE)
