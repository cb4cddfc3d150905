"""ModelRunner: turns a SchedulerOutput into one padded ragged batch and runs it on device.

Each step is a few compiled programs, dispatched back to back without waiting:

    hidden         = embed[T](embed_leaves, token_ids)
    hidden, new_kv = layers[bucket](group_leaves, group_kv, hidden, md)   # per group of layers
    logits         = head[T, R](head_leaves, embed_leaves, hidden, logits_indices)
    kv, summaries  = write[T](kv, summaries, new_kv, slot_mapping)        # both donated
    sampled        = sampler[R, flags](logits, sampling_tensors)

The layers run as `layers_per_program` layers per program, the same compiled program for every
group (one compile per bucket, not per layer; the default, 15, is argued in config.py).
Measured on SmolLM2-135M (30 layers) on Zen 3, compile per bucket: 2.1-2.6 s for groups of 1-6
layers against 6.6 s for all 30 unrolled; decode step at batch 1 within noise of the fully
unrolled program (36 vs 32 ms, under load). A `lax.scan`
over stacked layers compiled in 2 s but ran batch 1 at 125 ms: each iteration copied its
layer's weights out of the stacked array.

The cache write is its own program because on XLA:CPU a program that both reads and scatters
into a donated buffer copies it whole (kernels/ragged_paged_attention.py has the numbers); the
sampler is its own program so that sampling options (top-k, top-p, penalties, logprobs) compile
a small sampler variant instead of another 30-layer model.

The package: `buckets.py` (the padded shapes a step runs in), `batch.py` (`prepare`: a step as
host numpy), `programs.py` (the split model and the sampler program), `swap.py` (KV to and from
host memory), `layered.py` (layered prefill: a prefill batch one group of layers per step,
its hidden states kept on device between steps); this file holds the
runner itself (placement, the compiled programs and their cache, one step on device).

Pure at the jit boundary: the Flax model is split once (`nnx.split` of the embedding, of each
decoder layer and of the head) into a graph definition and a tuple of state leaves. The compiled
programs take those leaves as plain arrays and `nnx.merge` the graph definition inside the
trace, so no `nnx.Variable` crosses `jax.jit` per step. Every layer has the same graph
definition, so one program serves every group. `sync_weights()` re-reads the leaves after the
model's weights were changed in place (`LLM` calls it before each generate).

Sharding (parallel.py): the runner owns a mesh (one device by default). Params and the KV cache
are placed on it once; every program is compiled with its output shardings fixed (hidden
replicated, new K/V and the cache split on KV heads, logits split on the vocabulary), so each
step's arrays arrive exactly as the compiled programs expect and nothing recompiles. A step is
`prepare` (host: the batch as numpy, `StepInputs`) then `run` (device); with several processes
process 0 broadcasts the `StepInputs` and every process runs the same step (multihost.py).
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve import parallel
from jaxserve.config import EngineConfig
from jaxserve.errors import ConfigError
from jaxserve.kernels import cpu_library
from jaxserve.kernels.sparse import init_summaries
from jaxserve.kernels.storage import storage_dtype
from jaxserve.models import llama
from jaxserve.runner.batch import NUM_TOP_LOGPROBS, BatchBuilder, StepInputs, StepResult
from jaxserve.runner.buckets import Bucket, Buckets, group_size, pages_for_bytes
from jaxserve.runner.layered import LayeredPrefillRunner, concat_results, prefill_stages
from jaxserve.runner.programs import Programs, Split, sample_program, write_program
from jaxserve.runner.selection import SelectionCache, init_masks, write_masks
from jaxserve.runner.swap import KVSwapper
from jaxserve.sampler import SamplerOutput, token_logprobs
from jaxserve.sampling import SamplingParams, SamplingTensors
from jaxserve.sched import PENDING_TOKEN, SchedulerOutput


def _second_copy_fits(model: nnx.Module) -> bool:
    """Whether a packed copy of the model's weights leaves half the machine's memory free (a
    large model on a small host keeps one copy, slower, rather than run out of memory)."""
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(model)))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    if 2 * weights <= total // 2:
        return True
    logging.getLogger("jaxserve").warning(
        "not packing the weights for the CPU matmul: two copies of %.1f GB would take more than "
        "half of this machine's %.1f GB (cpu_packed_weights)", weights / 1e9, total / 1e9)
    return False


class ModelRunner:
    def __init__(self, model: llama.LlamaModel, engine: EngineConfig, num_pages: int, *,
                 mesh: Mesh | None = None):
        """`model` in the checkpoint layout (any placement); its parameters are laid out and
        placed on `mesh` (default: one device) in a model of the runner's own (`self.model`,
        the live model the programs run). `self.config` is the config the sharded model runs
        (more KV heads where they are replicated, see parallel.py)."""
        self.mesh = parallel.make_mesh(1) if mesh is None else mesh
        self.model, config = parallel.shard_model(model, self.mesh)
        # The programs' weights: packed for the CPU matmul (llama.packed_weights) on one CPU
        # device in bf16, else the model's own arrays.
        self._pack = False
        if self.mesh.size == 1 and self.mesh.devices.flat[0].platform == "cpu":
            llama.use_cpu_matmul(self.model)  # decode's projections: kernels/cpu_matmul.py
            self._pack = engine.cpu_packed_weights and self.model.dtype == jnp.bfloat16 \
                and cpu_library.has_bf16_dot() and _second_copy_fits(self.model)
        self.config, self.engine = config, engine
        self.num_pages, self.page_size = num_pages, engine.page_size
        self.kv_dtype = storage_dtype(self.model.dtype, self.mesh.devices.flat[0].platform)
        self._replicated = parallel.replicated(self.mesh)
        kv_sharding = parallel.kv_sharding(config, self.mesh)
        self.kv = jax.jit(lambda: llama.init_kv_cache(config, num_pages, engine.page_size,
                                                      self.kv_dtype), out_shardings=kv_sharding)()
        new_kv_sharding = NamedSharding(self.mesh, P(*kv_sharding.spec[1:]))  # [T, K, E]
        # Sparse decode attention: per-page key summaries [P, 2, K, E] beside the cache, split
        # on K like it, kept by the cache write (kernels/sparse.py). Swapping pages out and in
        # carries their summaries too (runner/swap.py: a summary is a function of its keys).
        self.sparse_attention, self.summaries = engine.sparse_attention, None
        summary_sharding = NamedSharding(self.mesh, P(None, None, *kv_sharding.spec[2:]))
        if engine.sparse_attention is not None:
            if config.sliding_window is not None:
                raise ConfigError("sparse_attention", "is not supported for sliding-window models")
            self.summaries = jax.jit(lambda: init_summaries(
                config.num_layers, num_pages, config.num_kv_heads, config.head_dim),
                out_shardings=summary_sharding)()
        logits_sharding = NamedSharding(self.mesh, parallel.spec_for(
            (None, "vocab"), (1, config.vocab_size), self.mesh))
        self.max_pages_per_request = -(-engine.max_model_len // engine.page_size)
        self.buckets = Buckets(engine)
        self.decode_buckets, self.token_buckets = self.buckets.decode, self.buckets.tokens
        self.batch = BatchBuilder(self.buckets, page_size=self.page_size, vocab_size=config.vocab_size,
                                  max_pages_per_request=self.max_pages_per_request,
                                  max_model_len=engine.max_model_len)
        self.layers_per_program = group_size(config.num_layers, engine.layers_per_program)
        # every parameter's shape, dtype and sharding, as the programs are compiled for them
        state = nnx.state(self.model)
        self._params = [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_value())
                        for (_, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(
                            parallel.state_shardings(state, self.mesh)))]
        self._splits = None
        embed_def, layer_def, head_def = self.sync_weights()
        rep, mesh = self._replicated, self.mesh

        def head(head_leaves, embed_leaves, hidden, logits_indices):
            return head_def.merge(head_leaves)(hidden, logits_indices, embed_def.merge(embed_leaves))

        self._embed = jax.jit(lambda leaves, ids: embed_def.merge(leaves)(ids), out_shardings=rep)
        # async scheduling: tokens still pending on the host come from the last step's samples
        self._embed_fed = jax.jit(lambda leaves, ids, fed, rows: embed_def.merge(leaves)(
            jnp.where(rows >= 0, fed[jnp.maximum(rows, 0)], ids)), out_shardings=rep)
        self.feeds = engine.async_scheduling and engine.prefill_policy == "chunked" \
            and jax.process_count() == 1  # steps may take pending tokens (async scheduling)
        # (row of each id, the last step's samples padded to the largest sampler row count)
        self._fed: tuple[dict[str, int], jax.Array] | None = None
        self._sampled = None  # the padded samples of the latest run()
        # (hidden, new K/V, chosen pages: () unless sparse attention keeps its choices)
        self._layers = jax.jit(lambda group, lkv, h, md, summ, dense, sel, sparse, refresh: (
            llama.run_layers([layer_def.merge(leaves) for leaves in group], lkv, h, md, mesh=mesh,
                             summaries=summ, sparse=sparse, dense_layers=dense,
                             selections=None if sel is None else (*sel, refresh)) + ((),))[:3],
            out_shardings=(rep, new_kv_sharding, rep), static_argnames=("sparse", "refresh"))
        self._write_selections = jax.jit(write_masks, donate_argnums=(0,), out_shardings=rep)
        self.selections, self.selection_cache = None, None
        self._keep_selections(engine.sparse_attention)
        def head_rows(head_leaves, embed_leaves, hidden, logits_indices, rows):
            """Logits of the first `rows` indices, zero rows padding them to the sampler's row
            count: a decode step of 1 request runs the tied head on 1 row, not 8 (XLA:CPU's
            8-row dot is no matrix-vector product: 15.4 against 5.3 ms a step at batch 1)."""
            logits = head(head_leaves, embed_leaves, hidden, logits_indices[:rows])
            return jnp.pad(logits, ((0, logits_indices.shape[0] - rows), (0, 0)))

        self._head = jax.jit(head_rows, out_shardings=logits_sharding, static_argnames=("rows",))
        self._prompt_logprobs = jax.jit(lambda hl, el, h, targets: token_logprobs(
            head(hl, el, h, jnp.arange(h.shape[0])), targets, NUM_TOP_LOGPROBS), out_shardings=rep)
        self._write = jax.jit(functools.partial(write_program, mesh=mesh, page_size=self.page_size),
                              donate_argnums=(0, 1), out_shardings=(
                                  kv_sharding, None if self.summaries is None else summary_sharding))
        vocab_split = logits_sharding.spec[1] is not None
        max_rows = self.buckets.sampler[-1]

        def sample(logits, t, banned, **static):  # and the tokens padded, for the next step
            out = sample_program(logits, t, banned, mesh=mesh if vocab_split else None, **static)
            return out, jnp.zeros(max_rows, jnp.int32).at[:out.token_ids.shape[0]].set(out.token_ids)

        self._sample = jax.jit(sample, out_shardings=rep,
                               static_argnames=("all_greedy", "needs_penalties", "num_logprobs"))
        self.broadcast = None  # set by multihost.py on process 0 of several: sends StepInputs
        # KV in host memory (swap.py): swapped-out requests and the host prefix tier
        self.swapper = None if not engine.uses_host_kv else \
            KVSwapper(kv_sharding, self.max_pages_per_request,
                      None if self.summaries is None else summary_sharding)
        self.programs = Programs(self._replicated)  # every compiled executable, by key
        # layered prefill (layered.py): the in-flight prefill batch and its stage programs
        self.layered = LayeredPrefillRunner(self, layer_def, new_kv_sharding, prefill_stages(
            config.num_layers, engine.prefill_stages)) if engine.prefill_policy == "layered" else None
        self._program, self._compiled = self.programs.get, self.programs.compiled

    def sync_weights(self, *, full: bool = False) -> tuple[Split, Split, Split]:
        """Read the model's parameters into the leaves the programs take (after a change to
        `self.model`'s weights, e.g. in a notebook); returns the splits. An edited array is put
        at its parameter's sharding; its shape and dtype, and the model's structure, must stay
        what the programs were compiled for.

        Walking the NNX graph costs ~45 ms for SmolLM2's 30 layers, so by default only the
        parameters' values are compared with what was last read (~0.1 ms); after replacing a
        module or a Variable object, pass full=True."""
        if not full and self._splits is not None and all(
                var.get_raw_value() is x for var, x in zip(self._variables, self._values)):
            return self._splits
        # nnx.state holds the model's own Variables: setting one sets the model's parameter
        flat = list(nnx.to_flat_state(nnx.state(self.model)))
        for (path, var), want in zip(flat, self._params, strict=True):
            x = var.get_value()
            if (tuple(x.shape), jnp.dtype(x.dtype)) != (want.shape, want.dtype):
                raise ValueError(f"parameter {'/'.join(map(str, path))} is now {x.dtype}{list(x.shape)}; "
                                 f"the compiled programs take {want.dtype}{list(want.shape)}")
            if not isinstance(x, jax.Array) or x.sharding != want.sharding:
                var.set_value(parallel.place(x, want.sharding))
        view = llama.packed_weights if self._pack else (lambda module: module)
        embed_def, self._embed_leaves = Split.of(self.model.embed)
        head_def, self._head_leaves = Split.of(view(self.model.head))
        # the embedding as the head reads it (a tied head's packed table)
        self._head_embed_leaves = Split.of(view(self.model.embed))[1] if self._pack \
            and self.model.head.lm_head is None else self._embed_leaves
        layers = [Split.of(view(layer)) for layer in self.model.layers]
        self._layer_leaves = [leaves for _, leaves in layers]
        splits = embed_def, layers[0][0], head_def
        if any(d != splits[1] for d, _ in layers) or self._splits not in (None, splits):
            raise ValueError("the model's structure changed (every decoder layer must keep the one "
                             "graph definition the programs were compiled for)")
        self._variables = [var for _, var in flat]
        self._values = [var.get_raw_value() for var in self._variables]
        self._splits = splits
        return splits

    # -- buckets and compilation ------------------------------------------------------------

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far (model buckets, cache writes and sampler variants)."""
        return len(self.programs.compiled)

    @property
    def compile_seconds(self) -> float:
        return self.programs.seconds

    def bucket_for(self, num_tokens: int, num_requests: int, decode_only: bool) -> Bucket:
        return self.buckets.for_step(num_tokens, num_requests, decode_only)

    def all_buckets(self) -> list[Bucket]:
        return self.buckets.all()

    def _forward(self, b: Bucket, ids, md, logits_indices, selection=None, feed=None):
        """All layers over one padded batch: (logits [R, V], new_kv per layer, hidden [T, D]).
        selection: a decode step's SelectionInputs (selection.py) when sparse attention reuses
        its choices; None: a step of padding only. feed: (sampled tokens [R'] of the last
        step, their row for each token [T] or -1) when some tokens are pending (async)."""
        el = self._embed_leaves
        if feed is None:
            hidden = self._program(("embed", b.num_tokens), self._embed, el, ids)(el, ids)
        else:
            args = (el, ids, *feed)
            hidden = self._program(("embed_fed", b.num_tokens), self._embed_fed,
                                   *args)(*args)
        g, new_kv, chosen = self.layers_per_program, [], []
        # sparse attention: the decodes of every step (prefill chunks stay dense); choices are
        # kept across decode-only steps only
        sparse = self.sparse_attention
        reuse = sparse is not None and self.selection_cache is not None and b.query_block == 1
        if reuse:
            selection = selection or self.selection_cache.dummy(b.num_requests)
            refresh, arrays = selection.refresh, self._inputs(selection.arrays())
        for first in range(0, self.config.num_layers, g):
            group, lkv = tuple(self._layer_leaves[first:first + g]), self.kv[first:first + g]
            summ, dense = None, None
            if sparse is not None:  # which layers of the group stay dense: data, not a program
                summ = self.summaries[first:first + g]
                dense = self._put(np.arange(first, first + g) < sparse.dense_layers)
            sel = (self.selections[first:first + g], *arrays) if reuse else None
            args, static = (group, lkv, hidden, md, summ, dense, sel), dict(
                sparse=sparse, refresh=refresh if reuse else None)
            hidden, group_kv, group_chosen = self._program(("layers", b, *static.values()),
                                                           self._layers, *args, **static)(*args)
            new_kv.extend(group_kv)
            chosen.extend(group_chosen)
        if reuse:
            args = (self.selections, tuple(chosen), arrays[0])
            self.selections = self._program(("write_selections", b.num_requests),
                                            self._write_selections, *args)(*args)
        return self.logits(b, hidden, logits_indices), tuple(new_kv), hidden

    def logits(self, b: Bucket, hidden, logits_indices):
        """The head over the bucket's request rows: logits [sampler rows, V] float32, rows past
        the bucket's requests zero."""
        args = (self._head_leaves, self._head_embed_leaves, hidden, logits_indices)
        return self._program(("head", b.num_tokens, b.num_requests), self._head, *args,
                             rows=b.num_requests)(*args)  # sampler rows >= R (buckets.py)

    def warmup(self, progress: bool = True):
        """Compile every program a step can reach, so that serving compiles nothing: each
        bucket's model programs and cache write, the prompt log-prob program of each token
        count, and the three sampler variants of each sampler row count (batch.py).

        The steps are walked abstractly (programs lowered, nothing run), then the lowered
        programs compile in a thread per CPU core (XLA compiles outside the GIL). Measured on
        the default model with an empty XLA cache: see README (warmup)."""
        state = self.kv, self.summaries, self.selections
        with self.programs.deferred(progress):  # lowered here, compiled on leaving
            try:
                sampled = set()
                for b in self.all_buckets():
                    ids, md, li = self._dummy_batch(b)
                    logits, new_kv, hidden = self._forward(b, ids, md, li)
                    self._write_kv(b, new_kv, md.slot_mapping)
                    if b.query_block == 1 and self.selection_cache is not None:  # reusing too
                        self._forward(b, ids, md, li, self.selection_cache.dummy(
                            b.num_requests, refresh=False))
                    if b.query_block > 1:
                        self._prompt_logprobs_of(b, hidden, np.zeros(b.num_tokens, np.int32))
                        if self.layered is not None:
                            self.layered.warmup(b, md, hidden)
                    if self.feeds:
                        args = (self._embed_leaves, ids, np.zeros(self.buckets.sampler[-1], np.int32), ids)
                        self._program(("embed_fed", b.num_tokens), self._embed_fed, *args)
                    if li.shape[0] not in sampled:
                        sampled.add(li.shape[0])
                        for t, ban, num_logprobs in self.batch.sampler_variants(li.shape[0]):
                            self._run_sampler(logits, self._put(t), self._put(ban), num_logprobs)
            finally:
                self.kv, self.summaries, self.selections = state  # abstract values while walking
            if self.swapper is not None:  # copies to and from host memory, every size
                self.swapper.warmup(self.kv, self.summaries, self._program)
        self.check()  # one real step through the smallest bucket

    def measure_preemption_costs(self) -> tuple[float, float]:
        """(seconds per page swapped out and back, seconds per token of the largest prefill
        bucket): what preemption_mode="auto" weighs. Runs after warmup (nothing compiles)."""
        self.kv, self.summaries, per_page = self.swapper.measure_seconds_per_page(
            self.kv, self.summaries, self._program)
        b = self.all_buckets()[-1]
        ids, md, li = self._dummy_batch(b)
        t0 = time.perf_counter()
        logits, new_kv, _ = self._forward(b, ids, md, li)
        self._write_kv(b, new_kv, md.slot_mapping)
        jax.block_until_ready((logits, self.kv))
        return per_page, (time.perf_counter() - t0) / b.num_tokens

    def _inputs(self, tree):
        """A step's host arrays as the programs take them. On one process, the numpy arrays
        themselves: a compiled program copies its numpy arguments in its C++ dispatch path, and
        measured on this CPU (benchmarks/host.py) that costs ~8 us per array against ~120 us
        per array for jax.device_put of the same tree (a step has ~24), even though the
        metadata then travels once per layer group. Across processes, global arrays (_put)."""
        return tree if jax.process_count() == 1 else self._put(tree)

    def _put(self, tree):
        """Host numpy -> arrays replicated over the mesh (global arrays across processes)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self._replicated)
        return jax.tree_util.tree_map(lambda x: parallel.place(x, self._replicated), tree)

    def _write_kv(self, b: Bucket, new_kv, slot_mapping, first: int = 0):
        """Write layers first.. first + len(new_kv) of this step's K/V (and key summaries)
        into the cache, `layers_per_program` layers per call: one program per (token bucket,
        layer count) serves every group. A write of all 30 layers of the default model in one
        program compiled 2.4x slower than one of 10 (3.25 s against 1.36 s, 128 tokens)."""
        g = self.layers_per_program
        for at in range(0, len(new_kv), g):
            lo, n = first + at, min(g, len(new_kv) - at)
            summ = None if self.summaries is None else self.summaries[lo:lo + n]
            args = (self.kv[lo:lo + n], summ, new_kv[at:at + n], slot_mapping)
            kv, summ = self._program(("write", b.num_tokens, n), self._write, *args)(*args)
            self.kv = self.kv[:lo] + tuple(kv) + self.kv[lo + n:]
            if summ is not None:
                self.summaries = self.summaries[:lo] + tuple(summ) + self.summaries[lo + n:]

    def set_sparse_attention(self, config) -> None:
        """Decode steps from now on run with this SparseAttentionConfig (None: dense); a new
        configuration compiles its decode programs on first use. Needs the page summaries, kept
        only when the engine started with sparse attention."""
        if config is not None and self.summaries is None:
            raise ConfigError("sparse_attention", "can only be switched on an engine started with "
                                                  "one (others keep no page summaries)")
        self.sparse_attention = config
        self._keep_selections(config)

    def _keep_selections(self, config) -> None:
        """Device masks and host bookkeeping of kept page choices, when `config` reuses them
        (selection.py); a new configuration starts with none kept."""
        self.selections, self.selection_cache = None, None
        if config is not None and config.reuse_steps > 1:
            n = self.engine.max_num_seqs
            self.selection_cache = SelectionCache(n, config.reuse_steps, self.page_size)
            self.selections = jax.jit(lambda: init_masks(self.config.num_layers, n,
                self.max_pages_per_request), out_shardings=self._replicated)()

    def _dummy_batch(self, b: Bucket):
        return self._put(self.batch.dummy(b))

    def _metadata(self, b: Bucket, query_lens, kv_lens, page_tables):
        return self.batch.metadata(b, query_lens, kv_lens, page_tables)

    def _run_sampler(self, logits, t: SamplingTensors, ban, num_logprobs: int):
        rows = t.temperature.shape[0]
        static = dict(all_greedy=t.all_greedy, needs_penalties=t.needs_penalties,
                      num_logprobs=num_logprobs)
        key = ("sampler", rows, ban.shape[1], t.output_token_ids.shape, t.prompt_token_ids.shape,
               *static.values())
        return self._program(key, self._sample, logits, t, ban, **static)(logits, t, ban)

    # -- one step -----------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, params_of: dict[str, SamplingParams]) -> StepResult:
        """Run one scheduled step; sample for the entries whose step completes a prefill or decodes."""
        return self.collect(self.dispatch(out, params_of))

    def dispatch(self, out: SchedulerOutput, params_of: dict[str, SamplingParams]) -> list:
        """Start one step on the device without waiting for it; `collect` waits for its
        results. With async scheduling the next step is dispatched before this one's results
        are collected: its pending tokens are this step's samples, taken on the device."""
        sched, stage = out.scheduled, out.prefill_stage
        self._swap(out)
        if self.layered is not None and stage is None:
            self.layered.drop()  # its members all left
        parts = []  # (request ids by row, rows that sampled, device results, prompt rows, failed)
        if sched:  # the batch through every layer (with layered prefill: the decodes)
            inputs, prompt_rows, failed = self.prepare(out, params_of)
            if self.broadcast is not None:
                self.broadcast(inputs)
            keep = [i for i, s in enumerate(sched) if s.samples_token and s.request_id not in failed]
            res = self.run(inputs)
            if self.feeds:
                self._fed = {sched[i].request_id: i for i in keep}, self._sampled
            parts.append(([s.request_id for s in sched], keep, res, prompt_rows, failed))
        if stage is not None:  # one group of layers of the prefill batch (layered.py)
            done = self.layered.run(stage, params_of)
            if done is not None:
                parts.append(done)
        return parts

    def collect(self, parts: list) -> StepResult:
        """Wait for a dispatched step and bring its results to the host."""
        results = jax.device_get([p[2] for p in parts])
        if self.swapper is not None:
            self.swapper.settle()
        return concat_results([self._result(ids, keep, res, prompt_rows, failed) for
                               (ids, keep, _, prompt_rows, failed), res in zip(parts, results)])

    @staticmethod
    def _result(ids, keep, device_result, prompt_rows, failed) -> StepResult:
        (res, prompt_out), keep = device_result, np.array(keep, np.int64)
        pick = lambda x: None if x is None else np.asarray(x)[keep]  # noqa: E731
        prompt = {rid: (pos, tuple(np.asarray(x)[at:at + n] for x in prompt_out))
                  for rid, (pos, at, n) in prompt_rows.items()}
        return StepResult([ids[i] for i in keep], pick(res.token_ids), pick(res.logprobs),
                          pick(res.top_logprob_ids), pick(res.top_logprobs), pick(res.ranks),
                          prompt, failed)

    def prepare(self, out: SchedulerOutput, params_of: dict[str, SamplingParams],
                ) -> tuple[StepInputs, dict, dict[str, str]]:
        inputs, rows, failed = self.batch.prepare(out, params_of)
        pending = np.flatnonzero(inputs.token_ids == PENDING_TOKEN)
        if pending.size:  # async scheduling: the last step's samples, on the device
            starts = np.cumsum([s.num_new_tokens for s in out.scheduled])
            of = self._fed[0] if self._fed is not None else {}
            inputs.feed_rows = np.full(inputs.token_ids.shape, -1, np.int32)
            inputs.feed_rows[pending] = [of.get(out.scheduled[j].request_id, -1)
                                         for j in np.searchsorted(starts, pending, side="right")]
            inputs.token_ids[pending] = 0  # a row the last step did not sample: dropped anyway
        if self.selection_cache is not None and inputs.md.decode_only:
            inputs.selection = self.selection_cache.inputs(out.scheduled, inputs.bucket.num_requests)
        return inputs, rows, failed

    def _swap(self, out: SchedulerOutput) -> None:
        """The step's KV copies to and from host memory, before its batch: a page a copy out
        reads may be reused by this very step (swap.py)."""
        if out.swap_out or out.host_free or out.swap_in:
            self.kv, self.summaries = self.swapper.apply(self.kv, self.summaries, out,
                                                         self._program)

    def run(self, inputs: StepInputs) -> tuple[SamplerOutput, tuple | None]:
        """The device work of one step (every process runs it): forward, cache write, sampling,
        prompt log-probs when asked. Returns device arrays, replicated over the mesh."""
        b = inputs.bucket
        ids, md, li, tensors, ban = self._inputs((inputs.token_ids, inputs.md, inputs.logits_indices,
                                                  inputs.sampling, inputs.banned))
        feed = None if inputs.feed_rows is None else (self._fed[1], self._inputs(inputs.feed_rows))
        logits, new_kv, hidden = self._forward(b, ids, md, li, inputs.selection, feed)
        self._write_kv(b, new_kv, md.slot_mapping)
        res, self._sampled = self._run_sampler(logits, tensors, ban, inputs.num_logprobs)
        prompt_out = None
        if inputs.prompt_targets is not None:
            prompt_out = self._prompt_logprobs_of(b, hidden, inputs.prompt_targets)
        return res, prompt_out

    def _prompt_logprobs_of(self, b: Bucket, hidden, targets):
        targets, hl, el = self._inputs(targets), self._head_leaves, self._head_embed_leaves
        return self._program(("prompt_logprobs", b.num_tokens), self._prompt_logprobs,
                             hl, el, hidden, targets)(hl, el, hidden, targets)

    def reset_cache(self):
        """A zeroed KV cache in place of one a failed step may have consumed (it is donated to
        every write): what it held is lost, so its requests must recompute."""
        if self.layered is not None:
            self.layered.drop()
        self.kv = jax.tree_util.tree_map(
            lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self.kv)
        if self.summaries is not None:  # empty pages: min +inf, max -inf
            self.summaries = jax.tree_util.tree_map(lambda x: jax.device_put(jnp.stack(
                [jnp.full(x.shape[:1] + x.shape[2:], v, x.dtype) for v in (jnp.inf, -jnp.inf)],
                axis=1), x.sharding), self.summaries)
        if self.selection_cache is not None:  # the masks may be consumed too: choose afresh
            self._keep_selections(self.sparse_attention)

    def check(self):
        """Run the smallest bucket on a dummy batch (it writes only page 0, the padding page) and
        wait for it: raises if the device can no longer run steps."""
        b = self.all_buckets()[0]
        ids, md, li = self._dummy_batch(b)
        logits, new_kv, _ = self._forward(b, ids, md, li)
        self._write_kv(b, new_kv, md.slot_mapping)
        jax.block_until_ready((logits, self.kv))


__all__ = ["Bucket", "ModelRunner", "StepInputs", "StepResult", "pages_for_bytes"]
