"""Inference batches (`length_groups`, `token_budget`); training batches are tested with finetune."""

from __future__ import annotations

import random

import pytest

from pipeline.batching import ACCELERATOR_TOKEN_BUDGET, CPU_TOKEN_BUDGET, length_groups, pack_rows, token_budget


@pytest.mark.parametrize("seed", range(20))
def test_length_groups_take_each_index_once_longest_first_within_budget_and_rows(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 60), rng.randint(200, 1200)]) for _ in range(rng.randint(0, 40))]
    budget, max_rows = rng.choice([64, 512, 2048]), rng.randint(1, 16)
    groups = length_groups(lengths, budget, max_rows)
    flat = [i for group in groups for i in group]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for group in groups:
        assert 1 <= len(group) <= max_rows
        assert len(group) == 1 or len(group) * lengths[group[0]] <= budget
    # Greedy: a group was closed only because the next one would not fit.
    for group, following in zip(groups, groups[1:]):
        assert len(group) == max_rows or (len(group) + 1) * lengths[group[0]] > budget


def test_length_groups_keep_a_long_japanese_prompt_apart_from_short_english_ones():
    # A Japanese judge prompt runs to ~1,000 tokens, an English one to ~400: padded together,
    # every English row would cost as much as the Japanese one.
    lengths = [400, 1000, 380, 990, 420]
    assert length_groups(lengths, 2048, 16) == [[1, 3], [4, 0, 2]]
    assert length_groups(lengths, 2048, 2) == [[1, 3], [4, 0], [2]]
    assert length_groups([], 2048, 16) == []


def test_token_budget_is_small_on_a_cpu_and_wide_elsewhere():
    import torch

    assert token_budget(torch.device("cpu")) == token_budget("cpu") == CPU_TOKEN_BUDGET
    assert token_budget("cuda") == token_budget(torch.device("cuda", 0)) == ACCELERATOR_TOKEN_BUDGET > CPU_TOKEN_BUDGET


def test_pack_rows_fills_rows_without_splitting_records():
    rows = pack_rows([5, 4, 3, 3, 2, 7], max_length=8)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4, 5]
    assert all(sum([5, 4, 3, 3, 2, 7][i] for i in row) <= 8 for row in rows)
    assert len(rows) == 4  # 24 tokens need at least 3 rows of 8; 7 fits with nothing but 1 token
