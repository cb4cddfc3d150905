"""Engine: requests in, `RequestOutput`s out, one `step()` at a time.

    engine.add_request("a", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

`step()` is schedule (host, `sched/`), execute (device, `runner/`), postprocess (here: append
tokens, log-probs, incremental detokenization and stop strings, finished requests' pages freed).
With async scheduling (`EngineConfig.async_scheduling`, on by default) a step is scheduled and
dispatched before the one in flight is waited for: the host's schedule, prepare and postprocess
overlap the device's work, and each `step()` returns the outputs of the step before.
A request with `n > 1` runs as n sequences ("0_id", "1_id", ...) that share the prompt's pages
through the prefix cache; its `RequestOutput` gathers their `CompletionOutput`s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve import multihost
from jaxserve.config import EngineConfig, resolve_dtype
from jaxserve.errors import JaxserveError
from jaxserve.models.llama import LlamaModel
from jaxserve.outputs import RequestMetrics, RequestOutput
from jaxserve.parallel import (
    ShardingError,
    check_mesh,
    make_mesh,
    sharded_model_config,
    tensor_size,
)
from jaxserve.records import StepRecord, StepRecords
from jaxserve.request_state import (
    CONTEXT_TOKENS,
    RequestState,
    SequenceState,
    context_before,
    logprob_dict,
    position_logprobs,
    sequence_seeds,
    token_texts,
)
from jaxserve.runner import ModelRunner, StepResult, pages_for_bytes
from jaxserve.runner.buckets import kv_bytes_per_page
from jaxserve.runner.forced import execute_forced
from jaxserve.runner.layered import prefill_stages
from jaxserve.sampling import SamplingParams
from jaxserve.sched import FinishReason, Request, Scheduler, SchedulerConfig
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("jaxserve")

DEFAULT_MAX_MODEL_LEN = 2048


def enable_compilation_cache():
    """Keep compiled programs on disk (~/.cache/jaxserve/xla, or $JAXSERVE_XLA_CACHE; set it
    empty to disable), so that a second start skips most of the warmup's compile time."""
    import os

    import jax

    path = os.environ.get("JAXSERVE_XLA_CACHE", os.path.expanduser("~/.cache/jaxserve/xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class InvalidPromptError(JaxserveError, ValueError):
    """The prompt is empty, too long, or holds token ids outside the vocabulary."""


class EngineDeadError(JaxserveError, RuntimeError):
    """A step failed and the engine could not recover (the device cannot run steps)."""


class InvalidSamplingError(JaxserveError, ValueError):
    """Sampling parameters this model cannot honour (e.g. stop_token_ids outside its vocabulary)."""


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, progress: bool = True,
                 mesh: Mesh | None = None, **kwargs):
        """Load the model named by `config.model` (default model when None) and compile.
        mesh: a user's mesh with a "tensor" axis, instead of one built from
        `tensor_parallel_size` (see parallel.py)."""
        from jaxserve.models.loader import load_checkpoint
        from jaxserve.models.orbax import is_orbax_checkpoint, restore

        config = dataclasses.replace(config or EngineConfig(), **kwargs)
        multihost.initialize(config)  # before anything asks jax for devices
        config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype))
        if config.model is None:
            from jaxserve.models.fetch import default_model_path

            path = default_model_path()
        else:
            path = config.model
        mesh = mesh if mesh is not None else make_mesh(config.tensor_parallel_size)
        if is_orbax_checkpoint(path):  # both load straight into the mesh's shardings
            ckpt = restore(path, mesh, dtype=jnp.dtype(config.dtype))
        else:
            ckpt = load_checkpoint(path, dtype=jnp.dtype(config.dtype), mesh=mesh)
        if ckpt.gguf_metadata is not None:
            tokenizer = Tokenizer.from_gguf_metadata(ckpt.gguf_metadata)
        else:
            tokenizer = Tokenizer.from_dir(ckpt.source)
        self._setup(config, ckpt.model, tokenizer, progress, mesh)

    @classmethod
    def from_components(cls, config: EngineConfig, model: LlamaModel, tokenizer: Tokenizer, *,
                        progress: bool = False, mesh: Mesh | None = None) -> Engine:
        """An engine over already-loaded parts (tests, notebooks experimenting with weights).
        The engine runs its own copy of `model`'s parameters, placed on the mesh (`self.model`)."""
        self = cls.__new__(cls)
        if config.dtype == "auto":  # the model's own
            config = dataclasses.replace(config, dtype=jnp.dtype(model.dtype).name)
        self._setup(config, model, tokenizer, progress, mesh)
        return self

    @property
    def model(self) -> LlamaModel:
        """The live Flax model the engine runs (parameters on the mesh)."""
        return self.runner.model

    def _setup(self, config, model: LlamaModel, tokenizer, progress, mesh=None):
        enable_compilation_cache()
        model_config = model.config
        self.config, self.model_config, self.tokenizer = config, model_config, tokenizer
        self.max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN,
                                 model_config.max_position_embeddings)
        mesh = mesh if mesh is not None else make_mesh(config.tensor_parallel_size)
        check_mesh(model_config, mesh)  # a clear error before any loading onto devices
        if config.tensor_parallel_size not in (1, tensor_size(mesh)):
            raise ShardingError(f"tensor_parallel_size={config.tensor_parallel_size} but the mesh "
                                f"given has a tensor axis of {tensor_size(mesh)}; pass one of them")
        # KV pages by bytes count the KV heads as laid out on the mesh (replicated ones too).
        num_pages = config.num_kv_pages or pages_for_bytes(
            sharded_model_config(model_config, tensor_size(mesh)), config.page_size,
            config.dtype, config.kv_cache_memory, summaries=config.sparse_attention is not None)
        num_host_pages = 0 if not config.uses_host_kv else config.swap_space // (
            kv_bytes_per_page(sharded_model_config(model_config, tensor_size(mesh)),
                              config.page_size, config.dtype,
                              summaries=config.sparse_attention is not None))
        # layered prefill: stages by tokens, made divisors of the layer count (runner/layered.py)
        config = dataclasses.replace(config, prefill_stages=prefill_stages(
            model_config.num_layers, config.prefill_stages))
        self.config = config
        scheduler = Scheduler(SchedulerConfig(
            num_pages=num_pages, page_size=config.page_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            scheduling_policy=config.scheduling_policy, preemption_mode=config.preemption_mode,
            num_host_pages=num_host_pages, host_prefix_cache=config.host_prefix_cache,
            prefill_policy=config.prefill_policy, prefill_stages=config.prefill_stages))
        self.scheduler = scheduler
        self.runner = ModelRunner(model, dataclasses.replace(
            config, max_model_len=self.max_model_len), num_pages, mesh=mesh)
        scheduler.max_pending = 2 if self.runner.feeds else 1  # async scheduling: one ahead
        self._inflight: _Flight | None = None  # dispatched, not yet collected (async)
        multihost.attach(self.runner)  # several processes: process 0 broadcasts each step
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model_config.eos_token_ids)
        self._groups: dict[str, RequestState] = {}
        self._seqs: dict[str, tuple[RequestState, SequenceState]] = {}
        self._params_of: dict[str, SamplingParams] = {}
        self.num_preemptions = 0  # sequences preempted (recompute) since start
        self._rng = np.random.default_rng(config.seed)  # seeds of unseeded requests
        self.num_failed_steps = 0  # steps that raised and were recovered from
        self._strikes: dict[str, int] = {}  # sequence id -> failed steps it was part of
        self.dead: EngineDeadError | None = None  # set when a failed step could not be recovered
        # One StepRecord per step when config.record_steps (benchmarks, notebooks); else None.
        self.step_records: StepRecords | None = StepRecords() if config.record_steps else None
        t0 = time.perf_counter()
        self.runner.warmup(progress=progress)
        if config.preemption_mode == "auto":  # swap or recompute by measured costs
            per_page, per_token = self.runner.measure_preemption_costs()
            self.scheduler.config = dataclasses.replace(
                self.scheduler.config, swap_seconds_per_page=per_page,
                recompute_seconds_per_token=per_token)
        self.warmup_seconds = time.perf_counter() - t0

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, *, arrival_time: float | None = None,
                    priority: int = 0, client_id: str | None = None):
        """Queue a request. Raises a ValueError subclass, leaving nothing behind, if it can never run.
        priority: lower runs first under scheduling_policy="priority"; client_id: whose service
        the "fair" policy accounts (the server passes OpenAI's `user`)."""
        params = params or SamplingParams()
        if self.dead is not None:
            raise EngineDeadError(str(self.dead))
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        # Raw text prompts parse special-token text ("<|im_start|>") as vLLM and HF do.
        ids = self.tokenizer.encode(prompt, add_special_tokens=True, parse_special=True) \
            if text is not None else [int(t) for t in prompt]
        if not ids:
            raise InvalidPromptError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidPromptError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                     f"[0, {vocab})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:  # the runner bans them as int32 below min_tokens: checked here, not per step
            raise InvalidSamplingError(f"stop_token_ids {bad[:5]} are outside the vocabulary "
                                       f"[0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else \
            max(1, self.max_model_len - len(ids))
        if len(ids) + max_tokens > self.max_model_len:
            raise InvalidPromptError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the maximum "
                f"context length of {self.max_model_len} tokens")
        group = RequestState(request_id, text, ids, [], RequestMetrics(arrival_time or time.time()),
                       None if params.prompt_logprobs is None else [None])
        if params.prompt_logprobs is not None:
            group.prompt_texts = token_texts(self.tokenizer, ids)
        ids_of = [request_id] if params.n == 1 else [f"{k}_{request_id}" for k in range(params.n)]
        seeds = sequence_seeds(params, self._rng)
        added = []
        try:
            for k, seq_id in enumerate(ids_of):
                p = dataclasses.replace(params, seed=seeds[k]) if seeds[k] != params.seed else params
                self.scheduler.add_request(Request(
                    seq_id, ids, max_tokens, eos_token_ids=self.eos_token_ids,
                    stop_token_ids=frozenset(params.stop_token_ids or ()),
                    min_tokens=params.min_tokens, ignore_eos=params.ignore_eos, sampling_params=p,
                    # prompt log-probs need every prompt position computed (by the first sequence)
                    use_prefix_cache=params.prompt_logprobs is None, priority=priority,
                    client_id=client_id))
                added.append(seq_id)
                if k > 0:  # only the first sequence reports prompt log-probs
                    p = dataclasses.replace(p, prompt_logprobs=None)
                seq = SequenceState(seq_id, k, p, IncrementalDetokenizer(
                    self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop or (), include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens),
                    logprobs=[] if params.logprobs is not None else None)
                if params.logprobs is not None:
                    seq.logprob_detok = IncrementalDetokenizer(
                        self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)
                group.seqs.append(seq)
        except ValueError:
            for seq_id in added:
                self.scheduler.abort(seq_id)
            raise
        self._groups[request_id] = group
        for seq in group.seqs:
            self._seqs[seq.seq_id] = (group, seq)
            self._params_of[seq.seq_id] = seq.params

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its pages. False if it is unknown or already finished."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for seq in group.seqs:
            self.scheduler.abort(seq.seq_id)
            self._forget(seq.seq_id)
        if self.scheduler.has_host_pages_to_free() and not self.scheduler.has_unfinished_requests():
            self.step()  # nobody may step again soon: drop a swapped request's host copy now
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    def kv_state(self):
        """A snapshot of the KV pages each request holds and of the page pool (`KVState`: a
        grid in Jupyter, text elsewhere)."""
        from jaxserve.kv_state import KVState

        return KVState.of(self.scheduler)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that produced tokens or finished. With async
        scheduling the next step is dispatched first, then the one in flight is collected: its
        outputs are returned (a first call returns none)."""
        overlap = self._overlaps()
        prev, self._inflight = self._inflight, None
        if prev is not None and not overlap:  # a request now needs tokens on the host
            return self._land(prev)[0]  # the next call runs a step in order
        flight = self._launch(prev)
        if isinstance(flight, list):  # its dispatch failed: recovered, these are the outputs
            return flight
        if not overlap:
            return self._land(flight)[0]
        if prev is None:
            self._inflight = flight
            return []
        outputs, ok = self._land(prev, flight)
        if ok:  # (when every request has ended, the next call collects it, not waiting now)
            self._inflight = flight
        return outputs

    def _overlaps(self) -> bool:
        """May the next step be dispatched before the one in flight is collected?"""
        return self.runner.feeds and not any(p.uses_penalties for p in self._params_of.values())

    def _launch(self, prev: _Flight | None):
        """Schedule a step and dispatch it (a _Flight); after a failed dispatch, the outputs of
        the recovery (every step not collected is lost, `prev` included)."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            return _Flight(scheduled, None, start)
        try:
            return _Flight(scheduled, self.runner.dispatch(scheduled, self._params_of), start)
        except Exception as e:  # noqa: BLE001 - recovered from, or the engine is declared dead
            return self._recover([f.scheduled for f in (prev,) if f] + [scheduled], e)

    def _land(self, flight: _Flight, ahead: _Flight | None = None) -> tuple[list[RequestOutput], bool]:
        """Collect a dispatched step and apply it: (outputs, False if it failed, and with it
        the step `ahead` dispatched after it, and the engine recovered)."""
        scheduled, ok = flight.scheduled, True
        if flight.parts is None:
            self.scheduler.update(scheduled, {})
            outputs = []
        else:
            try:
                result = self.runner.collect(flight.parts)
            except Exception as e:  # noqa: BLE001 - recovered from, or the engine is declared dead
                outputs, ok = self._recover([scheduled] + ([ahead.scheduled] if ahead else []), e), False
            else:
                outputs = self._postprocess(scheduled, result)
        if self.step_records is not None:
            self.step_records.append(StepRecord.of(len(self.step_records), scheduled, self.scheduler, flight.start))
        return outputs, ok

    def step_forced(self, next_tokens: dict[str, int]) -> dict[str, float]:
        """One step whose "sampled" tokens are given (teacher forcing, jaxserve.eval): each
        request that samples in this step gets `next_tokens[its id]` appended, exactly as if
        drawn; returns {request id: the cross-entropy of that token under the step's logits}
        (nats). Requests finish as usual (max_tokens, stop tokens)."""
        if self._inflight is not None:  # teacher forcing runs its steps in order
            flight, self._inflight = self._inflight, None
            self._land(flight)
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            self.scheduler.update(scheduled, {})
            return {}
        result, ce = execute_forced(self.runner, scheduled, self._params_of, next_tokens)
        self._postprocess(scheduled, result)
        return ce

    @property
    def sparse_attention(self):
        """The SparseAttentionConfig decode steps run with now (None: dense)."""
        return self.runner.sparse_attention

    def set_sparse_attention(self, config) -> None:
        """Switch sparse decode attention (a SparseAttentionConfig, or None for dense) on an
        engine started with one (only those keep the page summaries). The first decode steps
        after a switch compile their programs; jaxserve.eval compares configurations this way."""
        self.runner.set_sparse_attention(config)

    def _recover(self, failed: list, error: Exception) -> list[RequestOutput]:
        """After a failed step, whose write may have consumed the (donated) KV cache: a zeroed
        cache, a check that the device still runs a step, and every running request recomputed.
        `failed`: the scheduler outputs not applied (with async scheduling, the failed step and
        the one dispatched next to it). A sequence in two failed steps finishes with "error"
        (it is the likely cause). Raises EngineDeadError, and refuses new requests from then
        on, if the runner cannot run."""
        log.error("engine step failed: %r; rebuilding the KV cache, recomputing its requests",
                  error, exc_info=error)
        self.num_failed_steps += 1
        self.scheduler.recompute_all(failed[0])
        try:
            if self.runner.broadcast is not None:  # the workers' state is unknown: no recovery
                raise RuntimeError("cannot recover a step of several processes")
            self.runner.reset_cache()
            self.runner.check()
        except Exception as e:  # noqa: BLE001 - the engine is unusable
            self.dead = EngineDeadError(f"a step failed ({error!r}) and the engine cannot run "
                                        f"steps any more ({e!r})")
            raise self.dead from error
        reasons = {}
        ids = dict.fromkeys(e.request_id for out in failed for e in out.scheduled + (
            out.prefill_stage.entries if out.prefill_stage else ()))
        for rid in ids:
            if self.scheduler.get_request(rid) is None:
                continue  # ended (a stop string, an abort) since it was scheduled
            strikes = self._strikes[rid] = self._strikes.get(rid, 0) + 1
            if strikes >= 2:
                self.scheduler.finish_request(rid, FinishReason.ERROR)
                reasons[rid] = "error"
        return self._collect(reasons)

    def _postprocess(self, scheduled, result: StepResult) -> list[RequestOutput]:
        now = time.time()
        entries = scheduled.scheduled + (scheduled.prefill_stage.entries
                                         if scheduled.prefill_stage is not None else ())
        # With async scheduling a step may hold requests that ended while it ran (and whose id
        # a new request may have taken since): their rows are dropped.
        ended = {e.request_id for e in entries if e.request.is_finished}
        if ended:
            result = result.only([rid not in ended for rid in result.request_ids])
        for s in entries:
            if s.request_id not in ended:
                group, _ = self._seqs[s.request_id]
                group.metrics.first_scheduled_time = group.metrics.first_scheduled_time or now
        for seq_id, (pos, (lps, top_ids, top_lps, ranks)) in result.prompt_logprobs.items():
            if seq_id in ended:
                continue
            group, seq = self._seqs[seq_id]
            k = seq.params.prompt_logprobs
            for j in range(len(lps)):
                if len(group.prompt_logprobs) != pos + j + 1:
                    continue  # recomputed after a preemption: already recorded
                at = pos + j + 1
                group.prompt_logprobs.append(logprob_dict(
                    self.tokenizer, k, group.prompt_token_ids[at], lps[j], ranks[j], top_ids[j], top_lps[j],
                    group.prompt_token_ids[max(0, at - CONTEXT_TOKENS):at], group.prompt_texts[at]))
        reasons: dict[str, str] = {}
        for seq_id, why in result.failed.items():  # their part of the step could not be built
            if seq_id in ended:
                continue
            log.error("request %s failed: %s", seq_id, why)
            self.scheduler.finish_request(seq_id, FinishReason.ERROR)
            reasons[seq_id] = "error"
        sampled = {rid: [int(t)] for rid, t in zip(result.request_ids, result.token_ids)}
        finished = {r.request_id: r for r in self.scheduler.update(scheduled, sampled)}
        for i, seq_id in enumerate(result.request_ids):
            group, seq = self._seqs[seq_id]
            token = int(result.token_ids[i])
            seq.token_ids.append(token)
            seq.cumulative_logprob += float(result.logprobs[i])
            if seq.logprobs is not None:
                seq.logprobs.append(position_logprobs(
                    self.tokenizer, seq.params.logprobs, token, result, i,
                    context_before(group.prompt_token_ids, seq.token_ids),
                    seq.logprob_detok.add([token])))
            group.metrics.first_token_time = group.metrics.first_token_time or now
            group.metrics.last_token_time = now
            if seq.index == 0:
                group.metrics.token_times.append(now)
            seq.text += seq.detok.add([token])
            if seq.detok.stopped:  # a stop string, also when completed on the last allowed token
                if seq_id not in finished:
                    self.scheduler.finish_request(seq_id, FinishReason.STOP)
                reasons[seq_id] = "stop"
                seq.stop_reason = seq.detok.stop_reason
            elif seq_id in finished:
                req = finished[seq_id]
                reasons[seq_id] = req.finish_reason.value
                if token in req.stop_token_ids and req.finish_reason == FinishReason.STOP:
                    seq.stop_reason = token
        return self._collect(reasons, touched={self._seqs[r][0].request_id for r in result.request_ids})

    def _collect(self, reasons: dict[str, str], touched: set[str] = frozenset()) -> list[RequestOutput]:
        """Mark finished sequences, and build the outputs of every group that changed."""
        now = time.time()
        groups = set(touched)
        for seq_id, reason in reasons.items():
            group, seq = self._seqs[seq_id]
            # Release text held back for a possible stop string (nothing if one was found).
            seq.text += seq.detok.flush()
            rest = seq.logprob_detok.flush() if seq.logprob_detok and seq.logprobs else ""
            if rest:  # an unfinished character at the end: it goes with the last token
                last, token = seq.logprobs[-1], seq.token_ids[-1]
                last[token] = dataclasses.replace(last[token],
                                                  decoded_token=last[token].decoded_token + rest)
            seq.finish_reason = reason
            groups.add(group.request_id)
        outputs = []
        for rid in groups:
            group = self._groups.get(rid)
            if group is None:
                continue
            if group.finished:
                group.metrics.finished_time = now
                del self._groups[rid]
                for seq in group.seqs:
                    self._forget(seq.seq_id)
            outputs.append(group.output())
        return outputs

    def _forget(self, seq_id: str):
        self._seqs.pop(seq_id, None)
        self._params_of.pop(seq_id, None)
        self._strikes.pop(seq_id, None)

    def __repr__(self) -> str:
        c = self.model_config
        return (f"Engine({c.architecture}, {c.num_layers} layers, dtype={self.config.dtype}, "
                f"max_model_len={self.max_model_len}, kv_pages={self.runner.num_pages}x"
                f"{self.config.page_size}, running={self.scheduler.num_running}, "
                f"waiting={self.scheduler.num_waiting})")


@dataclasses.dataclass
class _Flight:
    """A scheduled step and its dispatched device work (None: a step with nothing to run)."""

    scheduled: object  # SchedulerOutput
    parts: list | None
    start: float  # perf_counter at its schedule()
