"""Host-side request state: token ids, progress through the KV cache, and the state machine.

    add_request ─► WAITING ──schedule() admits──► RUNNING ──update(): stop / length──► FINISHED
                      ▲                                │
                      ├──────── PREEMPTED ◄────────────┤  when pages run out: pages freed, queued
                      │                                │  by the policy's rank; its admission
                      │                                │  recomputes prompt + outputs
                      └──────── SWAPPED ◄──────────────┘  or its KV copied to host memory
                                                           (host_page_ids) and copied back to
                                                           new device pages at its admission
    abort() / finish_request(): any unfinished state ──► FINISHED, pages freed at once

Tokens sampled by a step still on the device are PENDING_TOKEN in `output_token_ids` from the
schedule() that runs that step until the update() that applies it (sched/scheduler.py): the next
step can be scheduled before they are known (async scheduling).

Only the scheduler moves a request between states; the fields below the first block are its
bookkeeping and are read-only to everyone else. Sampling parameters live elsewhere: the request
carries them as an opaque `sampling_params` object for the engine and runner.
"""

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from jaxserve.errors import JaxserveError
from jaxserve.sched.page_manager import hash_page


PENDING_TOKEN = -1  # an output token sampled on the device, not yet known on the host


class InvalidRequestError(JaxserveError, ValueError):
    """A request's own fields are inconsistent (empty prompt, max_tokens < 1, ...)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # added, never admitted yet
    RUNNING = "running"  # holds pages covering its computed tokens
    PREEMPTED = "preempted"  # pages taken back; waits to recompute
    SWAPPED = "swapped"  # KV in host memory (host_page_ids); waits to be copied back
    FINISHED = "finished"  # pages freed; finish_reason says why


class FinishReason(enum.Enum):
    STOP = "stop"  # eos or a stop token (or the engine found a stop string)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the client went away or cancelled
    ERROR = "error"  # the engine failed while running it


def _token_set(token_ids: int | Iterable[int]) -> frozenset[int]:
    """One id (as HF configs often give eos_token_id) or many, as a frozenset."""
    if isinstance(token_ids, int):
        return frozenset((token_ids,))
    return frozenset(int(t) for t in token_ids)


@dataclass(eq=False)  # identity equality: two requests are never "the same" by value
class Request:
    request_id: str
    prompt_token_ids: list[int] = field(repr=False)
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()  # ends the request unless ignore_eos
    stop_token_ids: frozenset[int] = frozenset()  # end it even with ignore_eos
    min_tokens: int = 0  # no eos / stop token ends it before this many outputs
    ignore_eos: bool = False
    sampling_params: object | None = None  # opaque here; for the runner's sampler
    use_prefix_cache: bool = True  # False: compute every prompt token (e.g. for prompt log-probs)
    priority: int = 0  # lower runs first under the "priority" policy (vLLM's meaning)
    client_id: str | None = None  # whose service the "fair" policy accounts (OpenAI `user`)

    # ---- scheduler bookkeeping ----
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False, repr=False)
    # Tokens whose KV is in the cache; positions [0, num_computed_tokens).
    num_computed_tokens: int = field(default=0, init=False)
    # Page table: page_ids[i] holds positions [i * page_size, (i + 1) * page_size).
    page_ids: list[int] = field(default_factory=list, init=False, repr=False)
    # Tokens served from the prefix cache at the latest admission (a statistic).
    num_cached_tokens: int = field(default=0, init=False)
    num_preemptions: int = field(default=0, init=False)
    arrival_seq: int = field(default=0, init=False)  # order of add_request: FCFS rank, tie-break
    host_page_ids: list[int] = field(default_factory=list, init=False, repr=False)  # SWAPPED
    # Leading pages of page_ids already offered to the prefix cache.
    num_registered_pages: int = field(default=0, init=False, repr=False)
    # Chained hashes of the full pages of all token ids; tokens are append-only, so computed once.
    _page_hashes: list[bytes] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        # Copy, so a caller reusing its list cannot change what we hash and compute.
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        self.eos_token_ids = _token_set(self.eos_token_ids)
        self.stop_token_ids = _token_set(self.stop_token_ids)
        if not self.prompt_token_ids:
            raise InvalidRequestError(f"request {self.request_id!r}: the prompt is empty")
        if self.max_tokens < 1:
            raise InvalidRequestError(
                f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}"
            )
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidRequestError(
                f"request {self.request_id!r}: priority must be an integer, got {self.priority!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"request {self.request_id!r}: min_tokens must be in 0..max_tokens "
                f"({self.max_tokens}), got {self.min_tokens}"
            )

    # ---- token views ----

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Known tokens without KV yet: 1 while decoding, more in (re)prefill."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + outputs, without concatenating both."""
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        head = self.prompt_token_ids[start:end]
        return head + self.output_token_ids[: max(0, end - prompt_len)]

    def page_hashes(self, page_size: int, num_pages: int) -> list[bytes]:
        """Chained hashes of the first `num_pages` full pages (all must be full of known tokens)."""
        hashes = self._page_hashes
        while len(hashes) < num_pages:
            i = len(hashes)
            tokens = self.token_ids(i * page_size, (i + 1) * page_size)
            assert len(tokens) == page_size, "only full pages are hashed"
            hashes.append(hash_page(hashes[-1] if hashes else None, tokens))
        return hashes[:num_pages]

    # ---- stop checks ----

    def check_stop(self, num_outputs: int | None = None) -> FinishReason | None:
        """Why the request ends after output token `num_outputs` (default: its newest), or None
        to keep going. Output tokens after it may still be pending (async scheduling).

        The stop token itself stays in output_token_ids (the detokenizer decides what to show).
        eos / stop tokens before min_tokens are ignored (the sampler should mask them anyway).
        """
        n = self.num_output_tokens if num_outputs is None else num_outputs
        if n >= self.min_tokens:
            last = self.output_token_ids[n - 1]
            if (not self.ignore_eos and last in self.eos_token_ids) or last in self.stop_token_ids:
                return FinishReason.STOP
        if n >= self.max_tokens:
            return FinishReason.LENGTH
        return None
