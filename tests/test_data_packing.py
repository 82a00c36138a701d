"""Packing: the row format, the multipack planner and the resumable loader."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrm.data import IGNORE_INDEX, ByteTokenizer, PackedLoader, Sample, fit_to_budget, multipack, pack_row, task_samples
from hrm.errors import DataError

PAD = 256
FAST = settings(max_examples=60, deadline=None)

token_lists = st.lists(st.integers(0, 255), min_size=1, max_size=12)
samples_strategy = st.builds(Sample, token_lists, token_lists)


def check_row(batch, samples, budget, pad_id):
    """Every documented property of a packed row, checked sequence by sequence."""
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (budget,)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.int64
    assert batch.cu_seqlens.dtype == batch.prefix_lens.dtype == torch.int32
    assert batch.cu_seqlens.shape == (len(samples) + 1,) and batch.prefix_lens.shape == (len(samples),)
    inputs, labels, positions = batch.input_ids.tolist(), batch.labels.tolist(), batch.position_ids.tolist()
    cu, prefix = batch.cu_seqlens.tolist(), batch.prefix_lens.tolist()
    assert cu[0] == 0 and cu[-1] == batch.num_tokens <= budget
    for i, s in enumerate(samples):
        start, end = cu[i], cu[i + 1]
        n_inst = len(s.instruction)
        assert end - start == n_inst + len(s.response) - 1 == s.packed_len
        assert prefix[i] == n_inst
        assert inputs[start:end] == s.instruction + s.response[:-1]
        assert labels[start:end] == [IGNORE_INDEX] * (n_inst - 1) + s.response
        assert positions[start:end] == list(range(end - start))
    tail = slice(batch.num_tokens, budget)
    assert set(inputs[tail]) <= {pad_id} and set(labels[tail]) <= {IGNORE_INDEX} and set(positions[tail]) <= {0}
    assert batch.num_supervised == sum(len(s.response) for s in samples) == sum(x != IGNORE_INDEX for x in labels)


def unpack(batch):
    """Recover the (instruction, response) samples from a packed row."""
    cu, prefix = batch.cu_seqlens.tolist(), batch.prefix_lens.tolist()
    inputs, labels = batch.input_ids.tolist(), batch.labels.tolist()
    return [
        Sample(inputs[cu[i] : cu[i] + prefix[i]], labels[cu[i] + prefix[i] - 1 : cu[i + 1]]) for i in range(len(prefix))
    ]


# -- rows -------------------------------------------------------------------------------


def test_reference_row():
    samples = [
        Sample([11, 12, 13, 14, 15], [21, 22, 23]),
        Sample([31], [41, 42, 43, 44]),
        Sample([51, 52, 53], [61]),
        Sample([71, 72], [81, 82]),
    ]
    batch = pack_row(samples, 24, PAD)
    X = IGNORE_INDEX
    assert batch.input_ids.tolist() == [11, 12, 13, 14, 15, 21, 22, 31, 41, 42, 43, 51, 52, 53, 71, 72, 81] + [PAD] * 7
    assert batch.labels.tolist() == [X, X, X, X, 21, 22, 23, 41, 42, 43, 44, X, X, 61, X, 81, 82] + [X] * 7
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2] + [0] * 7
    assert batch.cu_seqlens.tolist() == [0, 7, 11, 14, 17]
    assert batch.prefix_lens.tolist() == [5, 1, 3, 2]
    assert (batch.num_tokens, batch.num_supervised) == (17, 10)
    check_row(batch, samples, 24, PAD)


@FAST
@given(st.lists(samples_strategy, max_size=8), st.integers(0, 20))
def test_pack_row_properties(samples, slack):
    budget = sum(s.packed_len for s in samples) + slack
    if budget == 0:
        budget = 1
    batch = pack_row(samples, budget, PAD)
    check_row(batch, samples, budget, PAD)
    assert unpack(batch) == samples


def test_pack_row_edge_cases():
    one_token = [Sample([7], [259])]  # one-token sequence: empty causal part
    check_row(pack_row(one_token, 1, PAD), one_token, 1, PAD)
    empty = pack_row([], 4, PAD)
    assert empty.cu_seqlens.tolist() == [0] and empty.prefix_lens.numel() == 0 and empty.num_tokens == 0
    assert empty.input_ids.tolist() == [PAD] * 4
    with pytest.raises(DataError, match="2 samples need 5 tokens, more than the row budget 4"):
        pack_row([Sample([1, 2], [3, 4]), Sample([1], [2, 3])], 4, PAD)
    moved = pack_row(one_token, 3, PAD).to("cpu")
    assert moved.num_tokens == 1 and moved.input_ids.tolist() == [7, PAD, PAD]


# -- multipack --------------------------------------------------------------------------


def same_plan(a, b):
    return len(a) == len(b) and all(
        len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y)) for x, y in zip(a, b)
    )


@FAST
@given(st.data(), st.integers(1, 64), st.integers(1, 5), st.integers(1, 3))
def test_multipack_properties(data, budget, num_rows, window_steps):
    lengths = data.draw(st.lists(st.integers(1, budget), max_size=120))
    steps = multipack(lengths, budget, num_rows, window_steps)
    assert same_plan(multipack(lengths, budget, num_rows, window_steps), steps)
    placed = [int(i) for step in steps for row in step for i in row]
    assert sorted(placed) == list(range(len(lengths)))  # nothing lost or duplicated
    for k, step in enumerate(steps):
        assert len(step) == num_rows
        assert all(sum(lengths[i] for i in row) <= budget for row in step)
        assert any(len(row) for row in step)
        if any(len(row) == 0 for row in step):
            assert k == len(steps) - 1  # only the last step may leave a rank without data


def test_multipack_is_deterministic_and_balanced():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 256, 4000)
    steps = multipack(lengths, 1024, num_rows=4)
    assert same_plan(multipack(lengths.copy(), 1024, num_rows=4), steps)
    loads = np.array([[lengths[row].sum() for row in step] for step in steps[:-1]])
    work = np.array([[(lengths[row] ** 2).sum() for row in step] for step in steps[:-1]])
    assert loads.min() >= 0.95 * 1024  # every row of every full step is nearly full
    assert np.median(work.max(1) / work.min(1)) < 1.2  # attention work is balanced across ranks
    assert lengths.sum() / (len(steps) * 4 * 1024) > 0.98


def test_multipack_errors():
    with pytest.raises(DataError, match="sample 1 has packed length 9, outside 1..8"):
        multipack([3, 9], 8)
    with pytest.raises(DataError, match="num_rows must be a positive integer"):
        multipack([3], 8, num_rows=0)
    assert multipack([], 8) == []


# -- loader -----------------------------------------------------------------------------


def distinct_samples(n, rng_seed=0, max_len=12):
    """Samples whose instruction starts with a unique id, so they can be told apart."""
    rng = np.random.default_rng(rng_seed)
    return [
        Sample(
            [1000 + i] + rng.integers(0, 256, rng.integers(0, max_len)).tolist(),
            rng.integers(0, 256, rng.integers(1, max_len)).tolist() + [259],
        )
        for i in range(n)
    ]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same_steps(a, b):
    return len(a) == len(b) and all(
        len(x) == len(y)
        and all(
            torch.equal(p.input_ids, q.input_ids)
            and torch.equal(p.labels, q.labels)
            and torch.equal(p.cu_seqlens, q.cu_seqlens)
            for p, q in zip(x, y)
        )
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("num_rows", [1, 3])
def test_loader_epochs_cover_every_sample_once(num_rows):
    samples = distinct_samples(300)
    loader = PackedLoader(samples, 64, seed=0, pad_id=PAD, num_rows=num_rows)
    for epoch in range(2):
        assert loader.epoch == epoch
        n_steps = loader.steps_per_epoch
        seen = []
        for step in take(loader, n_steps):
            assert len(step) == num_rows
            for batch in step:
                rows = unpack(batch)
                check_row(batch, rows, 64, PAD)
                seen += rows
        assert Counter(s.instruction[0] for s in seen) == Counter(1000 + i for i in range(300))
        assert sorted(seen, key=lambda s: s.instruction[0]) == samples
    assert 0.9 < loader.packing_efficiency <= 1.0


def test_loader_shuffles_per_epoch_and_seed():
    samples = distinct_samples(200)
    first = PackedLoader(samples, 64, seed=1, pad_id=PAD)
    order = lambda steps: [s.instruction[0] for step in steps for b in step for s in unpack(b)]
    epoch0 = order(take(first, first.steps_per_epoch))
    epoch1 = order(take(first, first.steps_per_epoch))
    assert epoch0 != epoch1
    again = PackedLoader(samples, 64, seed=1, pad_id=PAD)
    assert order(take(again, again.steps_per_epoch)) == epoch0
    other = PackedLoader(samples, 64, seed=2, pad_id=PAD)
    assert order(take(other, other.steps_per_epoch)) != epoch0


@pytest.mark.parametrize("skip", [0, 5, 13, 27])
def test_loader_resume_yields_the_same_steps(skip):
    samples = distinct_samples(100)
    original = PackedLoader(samples, 48, seed=7, pad_id=PAD, num_rows=2)
    assert original.steps_per_epoch < 20  # the resumed stretch crosses an epoch boundary
    take(original, skip)
    state = original.state_dict()
    expected = take(original, 25)
    resumed = PackedLoader(samples, 48, seed=7, pad_id=PAD, num_rows=2)
    resumed.load_state_dict(state)
    assert same_steps(take(resumed, 25), expected)
    assert resumed.state_dict() == original.state_dict()


def test_loader_state_mismatch():
    samples = distinct_samples(50)
    state = PackedLoader(samples, 48, seed=0, pad_id=PAD).state_dict()
    with pytest.raises(DataError, match="seed differ"):
        PackedLoader(samples, 48, seed=1, pad_id=PAD).load_state_dict(state)
    with pytest.raises(DataError, match="num_samples, fingerprint differ"):
        PackedLoader(samples[:-1], 48, seed=0, pad_id=PAD).load_state_dict(state)
    with pytest.raises(DataError, match="past the end of epoch 0"):
        PackedLoader(samples, 48, seed=0, pad_id=PAD).load_state_dict({**state, "step": 10_000})
    with pytest.raises(DataError, match="invalid position"):
        PackedLoader(samples, 48, seed=0, pad_id=PAD).load_state_dict({**state, "epoch": -1})


def test_too_long_skip_and_truncate():
    fits = Sample([1, 2, 3], [4, 5, 259])  # packed length 5
    long_response = Sample([1, 2], [3, 4, 5, 6, 7, 259])  # 7
    long_instruction = Sample([1, 2, 3, 4, 5, 6], [259])  # 6
    samples = [fits, long_response, long_instruction]

    kept, stats = fit_to_budget(samples, 5)
    assert kept == [fits] and (stats.read, stats.skipped_too_long, stats.truncated) == (3, 2, 0)

    kept, stats = fit_to_budget(samples, 5, too_long="truncate")
    assert kept == [fits, Sample([1, 2], [3, 4, 5, 6])]
    assert (stats.skipped_too_long, stats.truncated) == (1, 1)
    assert all(s.packed_len <= 5 for s in kept)

    loader = PackedLoader(samples, 5, seed=0, pad_id=PAD, too_long="truncate")
    assert (loader.stats.skipped_too_long, loader.stats.truncated, loader.num_samples) == (1, 1, 2)
    with pytest.raises(DataError, match="too_long must be 'skip' or 'truncate'"):
        PackedLoader(samples, 5, seed=0, pad_id=PAD, too_long="drop")


def test_loader_errors():
    with pytest.raises(DataError, match=r"no sample fits the row budget of 4 tokens \(1 given, 1 too long\)"):
        PackedLoader([Sample([1, 2, 3], [4, 5, 6])], 4, seed=0, pad_id=PAD)
    with pytest.raises(DataError, match="budget must be a positive integer"):
        PackedLoader([Sample([1], [2])], 0, seed=0, pad_id=PAD)
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        PackedLoader([Sample([1], [2])], 4, seed=-1, pad_id=PAD)


def test_loader_on_tasks_end_to_end():
    tok = ByteTokenizer()
    samples = task_samples("add", 500, "train", tok) + task_samples("reverse", 500, "train", tok)
    loader = PackedLoader(samples, 128, seed=0, pad_id=tok.pad_id, num_rows=2)
    step = next(loader)
    for batch in step:
        rows = unpack(batch)
        check_row(batch, rows, 128, tok.pad_id)
        inst = tok.decode(rows[0].instruction)
        resp = tok.decode(rows[0].response)
        assert rows[0].response[-1] == tok.eoa_id and resp
        assert inst
    assert loader.packing_efficiency > 0.9
