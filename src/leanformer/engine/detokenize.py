"""Token ids → text deltas for a stream of tokens: word boundaries, multi-byte characters, stop strings."""

from __future__ import annotations

from leanformer.engine.generate import _decode, _find_stop


class Detokenizer:
    """Token ids → text deltas for one request, with stop strings and multi-byte characters held back.

    Each new token is decoded after a short window of the tokens before it and the window's own text is
    cut off (`_decode`), so word boundaries come out as in a full decode at O(1) cost per token.
    """

    def __init__(self, tok, context: list[int], stop: list[str]) -> None:
        self.tok, self.stop = tok, [s for s in stop if s]
        self.window = list(context[-1:])
        self.pending: list[int] = []
        self.text = ""  # everything decoded so far: sent + held back
        self.sent = 0  # characters of self.text already handed out
        self.hold = max((len(s) - 1 for s in self.stop), default=0)

    def add(self, token: int) -> tuple[str, bool]:
        """→ (text to hand out now, whether a stop string was reached)."""
        self.pending.append(token)
        piece = _decode(self.tok, self.pending, self.window)
        if piece.endswith("\ufffd") and len(self.pending) < 4:
            return "", False  # half a UTF-8 character: wait for the rest of its bytes
        self.text += piece
        self.window = (self.window + self.pending)[-4:]
        self.pending = []
        if self.stop:
            # a match cannot start before `sent`: anything earlier was complete text already searched
            cut = _find_stop(self.text[self.sent :], self.stop)
            if cut is not None:
                delta = self.text[self.sent : self.sent + cut]
                self.sent = len(self.text)
                return delta, True
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent : safe], safe
        return delta, False

    def flush(self) -> str:
        if self.pending:
            self.text += _decode(self.tok, self.pending, self.window)
            self.pending = []
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta
