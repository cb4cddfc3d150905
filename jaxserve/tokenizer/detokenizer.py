"""Incremental detokenization: one request's token ids to text deltas, holding back incomplete
UTF-8 characters and text that may start a stop string."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxserve.tokenizer.core import Tokenizer

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, so its first space survives
_MAX_HELD_TOKENS = 3  # an unfinished UTF-8 character has at most 3 of its 4 bytes


class IncrementalDetokenizer:
    """Per-request streaming decoder with stop strings.

    `add(new_token_ids)` returns the text delta; the deltas concatenated (after `flush()`) equal
    `tokenizer.decode(output_ids)` up to a stop string. Offsets as in vLLM: `_window` holds the tokens
    from the prefix offset on, `_read` is where the not-yet-confirmed tokens start. A step decodes the
    window and confirms the text past the prefix, except trailing tokens of an incomplete character.
    Confirmed text that may begin a stop string is held in `_pending` until disambiguated.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: str | Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._skipped = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens  # as vLLM: no stop-string check until more tokens than this
        self._num_tokens = 0
        context = [int(i) for i in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        if self._decode(context).endswith("\ufffd"):
            context = []  # the prompt ends inside a character: decode the output on its own
        self._window = context
        self._read = len(context)
        self._prefix_text: str | None = None  # decode(_window[:_read]), cached while holding
        self._pending = ""  # confirmed text held back from the deltas (a possible stop-string start)
        self._emitted: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text so far (truncated at a stop string), including held-back text."""
        if len(self._emitted) > 1:
            self._emitted[:] = ["".join(self._emitted)]
        return (self._emitted[0] if self._emitted else "") + self._pending

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, new_token_ids: Iterable[int]) -> str:
        """Append the request's newly sampled tokens; return the text they complete."""
        if self.stopped:
            return ""
        start = len(self._window)
        self._window.extend(int(i) for i in new_token_ids)
        self._num_tokens += len(self._window) - start
        return self._advance(final=False)

    def flush(self) -> str:
        """Release everything held back (call once the request finished for another reason)."""
        if self.stopped:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[:self._read])
        new_text = self._decode(self._window)
        cut = len(self._window)
        if new_text.endswith("\ufffd") and not final:
            # Hold back the last few tokens if they hold an incomplete character: cut where the
            # text decodes the same in two parts, i.e. where the UTF-8 decoder is between characters.
            # (A character has at most 4 bytes, so at most 3 tokens of an unfinished one are here,
            # not counting skipped special tokens between them; if no such cut exists the bytes
            # are invalid, not unfinished, and are emitted as is.)
            held = 0
            for j in range(1, cut - self._read + 1):
                held += self._window[-j] not in self._skipped
                if held > _MAX_HELD_TOKENS:
                    break
                head, tail = self._decode(self._window[:-j]), self._decode(self._window[-j:])
                if tail.endswith("\ufffd") and head + tail == new_text:
                    cut, new_text = cut - j, head
                    break
        if cut > self._read:
            self._pending += new_text[len(self._prefix_text):]
            del self._window[:self._read]
            self._read = cut - self._read
            self._prefix_text = None
        return self._release(final)

    def _release(self, final: bool) -> str:
        # Earliest stop string in the pending text (it cannot hold one that started before it).
        best = None
        for s in self._stop if self._num_tokens > self._min_tokens else ():
            at = self._pending.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            delta = self._pending[:at + len(s) if self._include_stop else at]
            self._pending = ""
            self.stopped, self.stop_reason = True, s
        else:
            hold = 0 if final else self._stop_prefix_length(self._pending)
            delta, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        if delta:
            self._emitted.append(delta)
        return delta

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
