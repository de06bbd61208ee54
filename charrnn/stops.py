"""Stop strings: each sample ends at its first match, and nothing that might be part of a match is released early.

Text streams out as it is generated, so a character that could begin a stop string is held back until
the following characters show whether the match happens; on a match the held text and the match are
released (kept) or the match is dropped (cut). Matches are looked for in the generated text only,
not in the prime.
"""

from __future__ import annotations

from typing import Sequence

from charrnn.errors import UsageError


def check_stops(stops: Sequence[str]) -> None:
    """Reject a stop string that could never mean anything: the empty string would match before any text."""
    for s in stops:
        if not isinstance(s, str):
            raise UsageError(f"a stop string must be text (got {s!r})")
        if not s:
            raise UsageError("--stop must not be empty; give the text that ends a sample, e.g. --stop '\\n'")


class StopStrings:
    """Per stream: the generated text not yet released, and whether the stream has stopped."""

    def __init__(self, stops: Sequence[str], streams: int, keep: bool = False):
        check_stops(stops)
        # the longest first: of two matches that end at the same character, the one that starts earlier wins
        self.stops = sorted(set(stops), key=len, reverse=True)
        self.keep = keep
        self.held = [""] * streams
        self.stopped = [False] * streams

    @property
    def all_stopped(self) -> bool:
        return all(self.stopped)

    def feed(self, chars: list[str]) -> list[str]:
        """The next character of every stream in; per stream, the text that is now final ('' for none)."""
        return [self._feed_one(i, c) for i, c in enumerate(chars)]

    def flush(self) -> list[str]:
        """The text still held back (the samples ended without a match there)."""
        out = ["" if done else held for held, done in zip(self.held, self.stopped)]
        self.held = [""] * len(self.held)
        return out

    def _feed_one(self, i: int, c: str) -> str:
        if self.stopped[i]:
            return ""
        text = self.held[i] + c
        for s in self.stops:
            if text.endswith(s):
                self.stopped[i], self.held[i] = True, ""
                return text if self.keep else text[: len(text) - len(s)]
        # every match still possible starts inside the longest end of `text` that begins some stop string
        hold = self._longest_open_prefix(text)
        self.held[i] = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _longest_open_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that is the start (not the whole) of a stop string."""
        for n in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = text[-n:]
            if any(len(s) > n and s.startswith(tail) for s in self.stops):
                return n
        return 0
