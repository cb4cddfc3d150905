"""A step's batch as host numpy (`StepInputs`): tokens, attention metadata, sampling tensors.

No device work here: `prepare` is what process 0 broadcasts to the others (multihost.py), and
what an overlapped engine builds for step n+1 while step n runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.kernels import AttentionMetadata, build_metadata
from jaxserve.runner.buckets import Bucket, Buckets
from jaxserve.runner.selection import SelectionInputs
from jaxserve.sampling import MAX_STOP_TOKEN_IDS, SamplingParams, SamplingTensors
from jaxserve.sched import SchedulerOutput

NUM_TOP_LOGPROBS = 20  # top log-probs are computed for 20 and cut on host: one sampler variant
# Banned-token rows (eos + stop_token_ids of requests below min_tokens) have this fixed width,
# so their shape is no compile key; SamplingParams bounds stop_token_ids below it.
BAN_WIDTH = 2 * MAX_STOP_TOKEN_IDS
_FAILED_ROW = SamplingParams(temperature=0)  # the row of a request whose inputs failed to build


@dataclasses.dataclass
class StepResult:
    """What one step produced for the requests that sampled, in scheduled order."""

    request_ids: list[str]
    token_ids: np.ndarray  # [n]
    logprobs: np.ndarray  # [n] log-prob of the chosen token
    top_logprob_ids: np.ndarray | None  # [n, 20]
    top_logprobs: np.ndarray | None  # [n, 20]
    ranks: np.ndarray | None  # [n]
    prompt_logprobs: dict = dataclasses.field(default_factory=dict)  # see BatchBuilder.prompt_targets
    # Requests whose part of the step could not be built: {request_id: why}. They sampled nothing.
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def only(self, keep: list[bool]) -> StepResult:
        """The rows where `keep` is true (prompt log-probs and failures are by id: kept)."""
        rows = np.flatnonzero(np.asarray(keep, bool))
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return dataclasses.replace(self, request_ids=[self.request_ids[i] for i in rows],
                                   token_ids=pick(self.token_ids), logprobs=pick(self.logprobs),
                                   top_logprob_ids=pick(self.top_logprob_ids),
                                   top_logprobs=pick(self.top_logprobs), ranks=pick(self.ranks))


@dataclasses.dataclass
class StepInputs:
    """Everything the device work of one step needs, as host numpy: what process 0 broadcasts."""

    bucket: Bucket
    token_ids: np.ndarray  # [T] int32
    md: AttentionMetadata  # numpy, padded to the bucket
    logits_indices: np.ndarray  # [B] int32, each request's last token on T (B: sampler rows)
    sampling: SamplingTensors  # numpy, B rows
    banned: np.ndarray  # [B, BAN_WIDTH or 0] int32 tokens a row cannot draw (-1 = none)
    num_logprobs: int  # 0 in the greedy variant, else NUM_TOP_LOGPROBS (computed when wanted)
    prompt_targets: np.ndarray | None  # [T] int32 next prompt token per position; None: no prompt logprobs
    selection: SelectionInputs | None = None  # kept sparse page choices (selection.py), decode steps
    # async scheduling: [T] row of the last step's samples that gives each token, -1 where
    # token_ids holds it (None: none pending). Filled by the runner, which keeps those samples.
    feed_rows: np.ndarray | None = None


class BatchBuilder:
    def __init__(self, buckets: Buckets, *, page_size: int, max_pages_per_request: int,
                 vocab_size: int, max_model_len: int):
        self.buckets, self.page_size = buckets, page_size
        self.max_pages_per_request, self.vocab_size = max_pages_per_request, vocab_size
        self.max_model_len = max_model_len

    def metadata(self, b: Bucket, query_lens, kv_lens, page_tables) -> AttentionMetadata:
        return build_metadata(query_lens=query_lens, kv_lens=kv_lens, page_tables=page_tables,
                              page_size=self.page_size, num_tokens=b.num_tokens,
                              num_requests=b.num_requests,
                              num_pages_per_request=self.max_pages_per_request,
                              num_blocks=b.num_blocks, query_block=b.query_block)

    def dummy(self, b: Bucket):
        """(token ids, metadata, logits indices) of a batch that writes only page 0: one request
        of as many tokens as the bucket (and one request's page table) holds."""
        n = 1 if b.query_block == 1 else min(b.num_tokens, self.max_pages_per_request * self.page_size)
        md = self.metadata(b, [n], [n], [[0] * self.max_pages_per_request])
        rows = self.buckets.sampler_rows(b.num_requests)
        return np.zeros(b.num_tokens, np.int32), md, np.zeros(rows, np.int32)

    def sampler_variants(self, rows: int):
        """(SamplingTensors, banned, num_logprobs) of each sampler variant at `rows` rows: what
        warmup compiles so that no step compiles one (see `sampling_inputs`)."""
        greedy, plain = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
        penalized = SamplingParams(temperature=1.0, repetition_penalty=1.1)
        out = []
        for p, num_logprobs in ((greedy, 0), (plain, NUM_TOP_LOGPROBS), (penalized, NUM_TOP_LOGPROBS)):
            t = self._tensors([p], [0], [[]], [[]], rows, rng=np.random.default_rng(0))
            ban = np.full((rows, BAN_WIDTH if t.needs_penalties else 0), -1, np.int32)
            out.append((t, ban, num_logprobs))
        return out

    def _tensors(self, sp, positions, outputs, prompts, rows, **kw) -> SamplingTensors:
        return SamplingTensors.from_params(sp, positions, outputs, prompts, self.vocab_size,
                                           pad_to=rows, token_width=self.max_model_len, **kw)

    def prepare(self, out: SchedulerOutput, params_of: dict[str, SamplingParams], *,
                prefill: bool = False) -> tuple[StepInputs, dict, dict[str, str]]:
        """The step as host arrays; {request_id: (first prompt position, first row on T, rows)}
        of the requests that asked for prompt log-probs; and {request_id: why} of requests whose
        part of the step could not be built. `prefill`: pad to a prefill bucket whatever the
        entries are (a layered prefill batch).

        One request's part must never fail the others: if building the sampling inputs fails,
        each request's part is built alone to find the culprits, whose rows then run greedy with
        nothing banned and no prompt log-probs; their tokens are dropped (`StepResult.failed`)."""
        sched = out.scheduled
        qlens = [s.num_new_tokens for s in sched]
        # prefill: a prefill bucket even for 1-token entries (a layered prefill batch's stages
        # are compiled for prefill buckets only)
        b = self.buckets.for_step(sum(qlens), len(sched), not prefill and all(q == 1 for q in qlens))
        md = self.metadata(b, qlens, [s.end_position for s in sched], [s.page_ids for s in sched])
        ids = np.zeros(b.num_tokens, np.int32)
        ids[:sum(qlens)] = [t for s in sched for t in s.token_ids]
        last = np.cumsum(qlens) - 1  # each request's last token: where its next token is sampled
        logits_indices = np.zeros(self.buckets.sampler_rows(b.num_requests), np.int32)
        logits_indices[:len(sched)] = last
        sp = [params_of[s.request_id] for s in sched]
        failed: dict[str, str] = {}
        try:
            parts = self.sampling_inputs(b, sched, sp)
        except Exception:  # noqa: BLE001 - isolated below, request by request
            for s, p in zip(sched, sp):
                try:
                    self.sampling_inputs(self.buckets.largest, [s], [p])
                except Exception as e:  # noqa: BLE001 - reported as this request's error
                    failed[s.request_id] = f"{type(e).__name__}: {e}"
            if not failed:
                raise  # the batch as a whole, not one request: a step failure
            sp = [_FAILED_ROW if s.request_id in failed else p for s, p in zip(sched, sp)]
            parts = self.sampling_inputs(b, sched, sp, skip=set(failed))
        tensors, ban, targets, rows = parts
        num_logprobs = 0 if tensors.all_greedy and not tensors.want_logprobs else NUM_TOP_LOGPROBS
        return StepInputs(b, ids, md, logits_indices, tensors, ban, num_logprobs, targets), rows, failed

    def sampling_inputs(self, b: Bucket, sched, sp: list[SamplingParams], skip=frozenset()):
        """(SamplingTensors, banned [B, BAN_WIDTH or 0], prompt targets, prompt rows) of a step's
        requests; requests in `skip` ban nothing.

        Three sampler variants, whatever the requests ask for: greedy (all rows greedy, no
        log-probs, nothing banned), general (temperature, top-k/p, min-p, seeds, log-probs), and
        general with token-id arrays of fixed width (penalties, or stop tokens banned under
        min_tokens). The tensors' static flags name the variant."""
        reqs = [s.request for s in sched]
        # outputs before the token each entry samples (those after are pending: request.py)
        num_out = [max(0, s.end_position - r.num_prompt_tokens) for s, r in zip(sched, reqs)]
        banned = [sorted(r.eos_token_ids | r.stop_token_ids)
                  if n < p.min_tokens and r.request_id not in skip else []
                  for r, p, n in zip(reqs, sp, num_out)]
        rows = self.buckets.sampler_rows(b.num_requests)
        tensors = self._tensors(sp, num_out, [r.output_token_ids[:n] for r, n in zip(reqs, num_out)]
                                if any(p.uses_penalties for p in sp) else [()] * len(reqs),
                                [r.prompt_token_ids for r in reqs], rows)
        ban = np.full((rows, 0), -1, np.int32)
        if any(banned) or tensors.needs_penalties:
            ban = np.full((rows, BAN_WIDTH), -1, np.int32)
            for i, banned_ids in enumerate(banned):
                if len(banned_ids) > BAN_WIDTH:
                    raise ValueError(f"{len(banned_ids)} banned tokens exceed {BAN_WIDTH}")
                ban[i, :len(banned_ids)] = banned_ids  # ids were checked against V at submission
            if not tensors.needs_penalties:  # the variant with token-id arrays, all padding
                pad = np.full((rows, self.max_model_len), self.vocab_size, np.int32)
                tensors = dataclasses.replace(tensors, output_token_ids=pad, prompt_token_ids=pad,
                                              needs_penalties=True, all_greedy=False)
        if tensors.all_greedy and (tensors.want_logprobs or tensors.needs_penalties):
            # log-probs and penalties live in the general variants; greedy rows are still greedy
            tensors = dataclasses.replace(tensors, all_greedy=False)
        targets, prompt_rows = self.prompt_targets(b, sched, sp)
        return tensors, ban, targets, prompt_rows

    @staticmethod
    def prompt_targets(b: Bucket, sched, sp: list[SamplingParams]):
        """For requests that asked for prompt_logprobs: the next prompt token at each prompt
        position of this step's chunks ([T], or None when no request asked), and {request_id:
        (first position, first row, rows)}. Logits of every token are computed only in steps
        that carry such a request."""
        want, targets, start = {}, np.zeros(b.num_tokens, np.int32), 0
        for s, p in zip(sched, sp):
            prompt = s.request.prompt_token_ids
            n = min(s.end_position, len(prompt) - 1) - s.start_position  # positions with a next token
            if p.prompt_logprobs is not None and n > 0:
                targets[start:start + n] = prompt[s.start_position + 1: s.start_position + 1 + n]
                want[s.request_id] = (s.start_position, start, n)
            start += s.num_new_tokens
        return (targets if want else None), want
