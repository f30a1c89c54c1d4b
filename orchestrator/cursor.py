"""The data cursor: which dataset indices an adapter trains on next, resumable exactly.

The trainer owns one cursor per adapter and issues ``take(k)`` indices in rollout tasks; a
checkpoint stores ``state()`` and a resume continues with ``DataCursor.restore(state)``, so the
sample order after a resume equals the order without one (the *exact resume* invariant).

Order: epoch ``e`` visits every index of ``range(n)`` exactly once, in the order of
:func:`epoch_permutation` ``(n, seed, e)``; epochs follow each other without gaps, so ``take``
may span an epoch boundary.

Why a hand-written shuffle: ``random.shuffle`` and NumPy's ``Generator.permutation`` do not
promise the same output across Python/NumPy versions (only ``random.random()`` and NumPy's legacy
``RandomState`` are frozen). A checkpoint may be resumed years later on another platform, so the
permutation is a Fisher-Yates shuffle driven by SplitMix64 (Steele, Lea & Flood 2014), written in
pure integer arithmetic here: identical on every platform and version, forever. Draws use
Lemire's multiply-shift ``j = (x * (i + 1)) >> 64``; its bias is below ``n / 2**64``.
"""

from __future__ import annotations

from events.adapter_format import CursorState
from events.errors import ConfigError

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64's output function: a bijective 64-bit finaliser."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of ``range(n)`` in ``epoch`` for shuffle ``seed`` (a permutation).

    The stream state starts at ``mix64(mix64(seed mod 2**64) ^ epoch)`` (negative seeds are
    taken modulo 2**64), so every (seed, epoch) pair gets an independent-looking order.
    Cost: O(n) pure-Python steps (about 0.5 s per million indices), once per epoch.
    """
    order = list(range(n))
    state = _mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64))
    for i in range(n - 1, 0, -1):
        state = (state + _GOLDEN64) & _MASK64
        j = (_mix64(state) * (i + 1)) >> 64
        order[i], order[j] = order[j], order[i]
    return order


class DataCursor:
    """Issues dataset indices in a deterministic, epoch-reshuffled order; see the module doc."""

    def __init__(self, n: int, seed: int, *, epoch: int = 0, position: int = 0) -> None:
        """``n``: dataset size; ``seed``: the shuffle seed (``DatasetSpec.shuffle_seed``)."""
        if n <= 0:
            raise ConfigError(f"a data cursor needs a non-empty dataset, got n={n}")
        if epoch < 0:
            raise ConfigError(f"cursor epoch must be >= 0, got {epoch}")
        if not 0 <= position < n:
            raise ConfigError(f"cursor position must be in [0, {n}), got {position}")
        self._n = n
        self._seed = seed
        self._epoch = epoch
        self._position = position
        self._order = epoch_permutation(n, seed, epoch)

    @classmethod
    def restore(cls, state: CursorState) -> DataCursor:
        """The cursor exactly as it was when ``state`` was taken."""
        return cls(state.n, state.seed, epoch=state.epoch, position=state.position)

    def state(self) -> CursorState:
        """A frozen snapshot; ``restore(state())`` continues with the same indices."""
        return CursorState(n=self._n, seed=self._seed, epoch=self._epoch, position=self._position)

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the epoch the next index comes from)."""
        return self._epoch

    def take(self, k: int) -> list[int]:
        """The next ``k`` dataset indices, crossing into new (reshuffled) epochs as needed."""
        if k < 0:
            raise ConfigError(f"take(k) needs k >= 0, got {k}")
        out: list[int] = []
        while len(out) < k:
            step = min(k - len(out), self._n - self._position)
            out.extend(self._order[self._position : self._position + step])
            self._position += step
            if self._position == self._n:
                self._epoch += 1
                self._position = 0
                self._order = epoch_permutation(self._n, self._seed, self._epoch)
        return out
