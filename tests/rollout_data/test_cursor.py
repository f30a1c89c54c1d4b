"""The data cursor: deterministic epoch shuffles, epoch wrap, exact restore."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.errors import ConfigError
from orchestrator.cursor import CursorState, DataCursor, epoch_permutation


def test_same_seed_same_order_other_seed_other_order() -> None:
    assert DataCursor(50, seed=7).take(120) == DataCursor(50, seed=7).take(120)
    assert DataCursor(50, seed=7).take(50) != DataCursor(50, seed=8).take(50)


def test_permutation_is_pinned() -> None:
    """The order is part of the checkpoint format: it must never change across versions."""
    assert epoch_permutation(10, seed=0, epoch=0) == [4, 9, 2, 5, 1, 7, 6, 0, 3, 8]
    assert epoch_permutation(10, seed=-1, epoch=3) == epoch_permutation(10, 2**64 - 1, 3)


def test_shuffle_is_uniform() -> None:
    """All 24 orders of 4 items appear about equally often over seeds (chi-square, 23 dof)."""
    from collections import Counter

    trials = 4800
    counts = Counter(tuple(epoch_permutation(4, seed, 0)) for seed in range(trials))
    expected = trials / 24
    chi2 = sum((counts[p] - expected) ** 2 / expected for p in counts)
    assert len(counts) == 24
    assert chi2 < 60  # p < 1e-4 under uniformity


def test_epochs_wrap_and_reshuffle() -> None:
    cursor = DataCursor(5, seed=1)
    first = cursor.take(5)
    assert sorted(first) == list(range(5)) and cursor.epoch == 1
    assert cursor.state() == CursorState(n=5, seed=1, epoch=1, position=0)
    second = cursor.take(3)
    assert cursor.state() == CursorState(n=5, seed=1, epoch=1, position=3)
    second += cursor.take(4)  # crosses into epoch 2
    assert sorted(second[:5]) == list(range(5))
    assert second[:5] == epoch_permutation(5, 1, 1) != first
    assert second[5:] == epoch_permutation(5, 1, 2)[:2]
    assert cursor.epoch == 2


def test_take_zero_and_more_than_an_epoch() -> None:
    cursor = DataCursor(3, seed=2)
    assert cursor.take(0) == []
    assert cursor.state().position == 0
    many = cursor.take(10)
    assert [sorted(many[i : i + 3]) for i in (0, 3, 6)] == [[0, 1, 2]] * 3
    assert cursor.state() == CursorState(n=3, seed=2, epoch=3, position=1)


def test_exact_restore() -> None:
    cursor = DataCursor(17, seed=123)
    cursor.take(11)
    cursor.take(9)
    saved = cursor.state()
    expected = cursor.take(40)
    restored = DataCursor.restore(saved)
    assert restored.state() == saved
    assert restored.take(40) == expected
    assert restored.state() == cursor.state()


def test_state_round_trips_through_json() -> None:
    import msgspec

    state = DataCursor(9, seed=4, epoch=2, position=5).state()
    assert msgspec.json.decode(msgspec.json.encode(state), type=CursorState) == state


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0, "seed": 1}, "non-empty dataset"),
        ({"n": 3, "seed": 1, "position": 3}, r"position must be in \[0, 3\)"),
        ({"n": 3, "seed": 1, "epoch": -1}, "epoch must be >= 0"),
    ],
)
def test_invalid_states(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DataCursor(**kwargs)


def test_negative_take() -> None:
    with pytest.raises(ConfigError, match="k >= 0"):
        DataCursor(3, seed=0).take(-1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=st.integers(-(2**70), 2**70),
    chunks=st.lists(st.integers(0, 30), min_size=1, max_size=20),
    restore_at=st.integers(0, 19),
)
def test_every_index_once_per_epoch(n: int, seed: int, chunks: list[int], restore_at: int) -> None:
    cursor = DataCursor(n, seed)
    issued: list[int] = []
    for i, k in enumerate(chunks):
        if i == restore_at:
            cursor = DataCursor.restore(cursor.state())
        issued += cursor.take(k)
    full_epochs = len(issued) // n
    for e in range(full_epochs):
        assert sorted(issued[e * n : (e + 1) * n]) == list(range(n))
    rest = issued[full_epochs * n :]
    assert len(set(rest)) == len(rest)
    assert cursor.state() == CursorState(n=n, seed=seed, epoch=full_epochs, position=len(rest))
