"""Stop strings found in text that arrives a few characters at a time, at a cost per character.

The scheduler thread serves every stream, so the work a request's stop strings cost per token is
paid by all of them. Re-scanning the text's tail for each stop string (`runtime.loop.held_back`:
every prefix of every stop, tried against the end of the text) costs about len(stop) string
operations per stop per token; with 16 stops of 3,000 characters that was 1.6-7 ms a token.
`StopScanner` keeps one Knuth-Morris-Pratt state per stop string instead (how much of the text's
end is a start of that stop), so each new character costs amortized O(1) per stop, whatever the
stops' lengths; protocol.check_options bounds how many there are and how long.

It answers the two questions `Model.generate` / `Model.stream` answer (runtime/loop.py), with the
same results: where the first stop string that ends in the new text begins (the text ends
there), and how many trailing characters could still begin one (held back from a stream).
"""
from __future__ import annotations

from typing import Sequence


def _failure(s: str) -> list[int]:
    """KMP's failure table: f[i] is the length of the longest proper prefix of s[: i + 1] that is
    also a suffix of it (where to carry on matching after a mismatch at i + 1)."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopScanner:
    """Feed a text piece by piece; `feed` says where a stop string begins, `held` how much of the
    text's end could begin one."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            # (the HTTP side refuses it first; this guards the scheduler against other callers)
            raise ValueError("an empty stop string would stop at once; remove it")
        self.stops = list(stops)
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: the text's end matches its first _state[j] chars
        self._fed = 0

    def feed(self, piece: str) -> int | None:
        """Take the next piece of text; the index (in the whole text fed) where the earliest stop
        string that ends in this piece begins, or None. After a match, feed no more."""
        first = None
        for j, s in enumerate(self.stops):
            q = self._state[j]
            if q == 0 and s[0] not in piece:  # the usual case, at C speed: nothing of s begins here
                continue
            f, n = self._fail[j], len(s)
            for i, ch in enumerate(piece):
                while q and s[q] != ch:
                    q = f[q - 1]
                if s[q] == ch:
                    q += 1
                    if q == n:  # the first (so earliest) occurrence of s ends here
                        begin = self._fed + i + 1 - n
                        first = begin if first is None else min(first, begin)
                        q = f[q - 1]
                        break
            self._state[j] = q
        self._fed += len(piece)
        return first

    @property
    def held(self) -> int:
        """How many trailing characters of the text could be the start of a stop string (what
        `runtime.loop.held_back` returns for the text fed so far, when no stop has matched)."""
        return max(self._state, default=0)
