"""ModelRunner: turns a SchedulerOutput into one padded ragged batch and runs it on device.

Each step is a few compiled programs, dispatched back to back without waiting:

    hidden         = embed[T](embed_leaves, token_ids)
    hidden, new_kv = layers[bucket](group_leaves, group_kv, hidden, md)   # per group of layers
    logits         = head[T, R](head_leaves, embed_leaves, hidden, logits_indices)
    kv             = write[T](kv, new_kv, slot_mapping)                   # kv donated
    sampled        = sampler[R, flags](logits, sampling_tensors)

The layers run as `layers_per_program` layers per program, the same compiled program for every
group (one compile per bucket, not per layer). Measured on SmolLM2-135M (30 layers), compile
per bucket: 2.1-2.6 s for groups of 1-6 layers against 6.6 s for all 30 unrolled; decode step
at batch 1 within noise of the fully unrolled program (36 vs 32 ms, under load). A `lax.scan`
over stacked layers compiled in 2 s but ran batch 1 at 125 ms: each iteration copied its
layer's weights out of the stacked array.

The cache write is its own program because on XLA:CPU a program that both reads and scatters
into a donated buffer copies it whole (kernels/ragged_paged_attention.py has the numbers); the
sampler is its own program so that sampling options (top-k, top-p, penalties, logprobs) compile
a small sampler variant instead of another 30-layer model.

Buckets (`Bucket`): a step is padded to a token count T and a request count R.
  decode-only steps: T = R = N (one query block per request), from `decode_buckets`;
  steps with prefill: T a power of two from 16 to max_num_batched_tokens, R = min(T, max_num_seqs),
  query blocks of 16 tokens, N = R + T / 16 blocks (enough for any split of T tokens over R).
The page-table width is fixed at max_model_len / page_size: the attention loops only over the
pages the longest request needs, so context length is no bucket dimension.

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

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve import parallel
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.kernels import AttentionMetadata, build_metadata, write_kv
from jaxserve.kernels.storage import storage_dtype
from jaxserve.models import llama
from jaxserve.sampling import (SamplerOutput, SamplingParams, SamplingTensors, sample,
                               token_logprobs)
from jaxserve.sched import SchedulerOutput

PREFILL_QUERY_BLOCK = 16
NUM_TOP_LOGPROBS = 20  # top log-probs are computed for 20 and cut on host: one sampler variant
_FAILED_ROW = SamplingParams(temperature=0)  # the row of a request whose inputs failed to build


@dataclasses.dataclass(frozen=True)
class Bucket:
    num_tokens: int  # T
    num_requests: int  # R
    query_block: int  # tokens per attention query block

    @property
    def num_blocks(self) -> int:  # N
        return self.num_tokens if self.query_block == 1 else (
            self.num_requests + self.num_tokens // self.query_block)


@dataclasses.dataclass
class StepResult:
    """What one step produced for the requests that sampled, in scheduled order."""

    request_ids: list[str]
    token_ids: np.ndarray  # [n]
    logprobs: np.ndarray  # [n] log-prob of the chosen token
    top_logprob_ids: np.ndarray | None  # [n, 20]
    top_logprobs: np.ndarray | None  # [n, 20]
    ranks: np.ndarray | None  # [n]
    prompt_logprobs: dict = dataclasses.field(default_factory=dict)  # see ModelRunner._prompt_step
    # Requests whose part of the step could not be built: {request_id: why}. They sampled nothing.
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepInputs:
    """Everything the device work of one step needs, as host numpy: what process 0 broadcasts."""

    bucket: Bucket
    token_ids: np.ndarray  # [T] int32
    md: AttentionMetadata  # numpy, padded to the bucket
    logits_indices: np.ndarray  # [R] int32, each request's last token on T
    sampling: SamplingTensors  # numpy, R rows
    banned: np.ndarray  # [R, k] int32 tokens a row cannot draw (-1 = none), k a power of two or 0
    num_logprobs: int  # top log-probs to compute (0 or NUM_TOP_LOGPROBS)
    prompt_targets: np.ndarray | None  # [T] int32 next prompt token per position; None: no prompt logprobs


@dataclasses.dataclass(frozen=True)
class _Split:
    """A module split once: its graph definition and the structure of its state leaves, merged
    back into a module inside a trace."""

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef

    @classmethod
    def of(cls, module: nnx.Module) -> tuple[_Split, tuple[jax.Array, ...]]:
        graphdef, state = nnx.split(module)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        return cls(graphdef, treedef), tuple(leaves)

    def merge(self, leaves):
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


class ModelRunner:
    def __init__(self, model: llama.LlamaModel, engine: EngineConfig, num_pages: int, *,
                 mesh: Mesh | None = None):
        """`model` in the checkpoint layout (any placement); its parameters are laid out and
        placed on `mesh` (default: one device) in a model of the runner's own (`self.model`,
        the live model the programs run). `self.config` is the config the sharded model runs
        (more KV heads where they are replicated, see parallel.py)."""
        self.mesh = parallel.make_mesh(1) if mesh is None else mesh
        self.model, config = parallel.shard_model(model, self.mesh)
        self.config, self.engine = config, engine
        self.num_pages, self.page_size = num_pages, engine.page_size
        self.kv_dtype = storage_dtype(self.model.dtype, self.mesh.devices.flat[0].platform)
        self._replicated = parallel.replicated(self.mesh)
        kv_sharding = parallel.kv_sharding(config, self.mesh)
        self.kv = jax.jit(lambda: llama.init_kv_cache(config, num_pages, engine.page_size,
                                                      self.kv_dtype), out_shardings=kv_sharding)()
        new_kv_sharding = NamedSharding(self.mesh, P(*kv_sharding.spec[1:]))  # [T, K, E]
        logits_sharding = NamedSharding(self.mesh, parallel.spec_for(
            (None, "vocab"), (1, config.vocab_size), self.mesh))
        self.max_pages_per_request = -(-engine.max_model_len // engine.page_size)
        self.decode_buckets = sorted({min(b, engine.max_num_seqs) for b in engine.decode_buckets}
                                     | {engine.max_num_seqs})
        self.token_buckets = _powers_of_two(min(16, engine.max_num_batched_tokens),
                                            engine.max_num_batched_tokens)
        self.layers_per_program = _group_size(config.num_layers, engine.layers_per_program)
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
        self._layers = jax.jit(lambda group, lkv, h, md: llama.run_layers(
            [layer_def.merge(leaves) for leaves in group], lkv, h, md, mesh=mesh),
            out_shardings=(rep, new_kv_sharding))
        self._head = jax.jit(head, out_shardings=logits_sharding)
        self._prompt_logprobs = jax.jit(lambda hl, el, h, targets: token_logprobs(
            head(hl, el, h, jnp.arange(h.shape[0])), targets, NUM_TOP_LOGPROBS), out_shardings=rep)
        self._write = jax.jit(functools.partial(write_kv, mesh=mesh), donate_argnums=0,
                              out_shardings=kv_sharding)
        vocab_split = logits_sharding.spec[1] is not None
        self._sample = jax.jit(functools.partial(_sample_program, mesh=mesh if vocab_split else None),
                               out_shardings=rep,
                               static_argnames=("all_greedy", "needs_penalties", "num_logprobs"))
        self.broadcast = None  # set by multihost.py on process 0 of several: sends StepInputs
        self._compiled: dict[tuple, object] = {}
        self.compile_seconds = 0.0

    def sync_weights(self, *, full: bool = False) -> tuple[_Split, _Split, _Split]:
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
        embed_def, self._embed_leaves = _Split.of(self.model.embed)
        head_def, self._head_leaves = _Split.of(self.model.head)
        layers = [_Split.of(layer) for layer in self.model.layers]
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
        return len(self._compiled)

    def _prefill_bucket(self, t: int) -> Bucket:
        # Up to T/4 requests (all of them in the largest bucket): every padding request costs a
        # padding query block (measured: a 128-token prefill padded to 64 requests spent most of
        # its attention on them).
        r = t if t == self.token_buckets[-1] else max(1, t // 4)
        return Bucket(t, min(r, self.engine.max_num_seqs), PREFILL_QUERY_BLOCK)

    def bucket_for(self, num_tokens: int, num_requests: int, decode_only: bool) -> Bucket:
        if decode_only:
            r = next(b for b in self.decode_buckets if b >= num_requests)
            return Bucket(r, r, 1)
        for t in self.token_buckets:
            b = self._prefill_bucket(t)
            if t >= num_tokens and b.num_requests >= num_requests:
                return b
        raise ValueError(f"no bucket holds {num_tokens} tokens of {num_requests} requests")

    def all_buckets(self) -> list[Bucket]:
        return [Bucket(r, r, 1) for r in self.decode_buckets] + [
            self._prefill_bucket(t) for t in self.token_buckets]

    def _program(self, key: tuple, jitted, *args, **static):
        """The compiled executable for `key`, compiling (and counting) it the first time."""
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = jitted.lower(*args, **static).compile()
            self.compile_seconds += time.perf_counter() - t0
            self._compiled[key] = exe
        return exe

    def _forward(self, b: Bucket, ids, md, logits_indices):
        """All layers over one padded batch: (logits [R, V], new_kv per layer, hidden [T, D])."""
        el, hl = self._embed_leaves, self._head_leaves
        hidden = self._program(("embed", b.num_tokens), self._embed, el, ids)(el, ids)
        g, new_kv = self.layers_per_program, []
        for first in range(0, self.config.num_layers, g):
            group, lkv = tuple(self._layer_leaves[first:first + g]), self.kv[first:first + g]
            hidden, group_kv = self._program(("layers", b), self._layers, group, lkv, hidden, md)(
                group, lkv, hidden, md)
            new_kv.extend(group_kv)
        logits = self._program(("head", b.num_tokens, b.num_requests), self._head,
                               hl, el, hidden, logits_indices)(hl, el, hidden, logits_indices)
        return logits, tuple(new_kv), hidden

    def warmup(self, progress: bool = True):
        """Compile every bucket (and the greedy and plain-temperature samplers for each request
        count) up front, so that serving compiles nothing."""
        from tqdm.auto import tqdm

        buckets = self.all_buckets()
        for b in tqdm(buckets, desc="Compiling buckets", disable=not progress, unit="bucket"):
            ids, md, li = self._dummy_batch(b)
            logits, new_kv, _ = self._forward(b, ids, md, li)
            self._write_kv(b, new_kv, md.slot_mapping)
            for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0)):
                t = SamplingTensors.from_params([params], [0], [[]], [[]], self.config.vocab_size,
                                                pad_to=b.num_requests, rng=np.random.default_rng(0))
                self._run_sampler(logits, self._put(t),
                                  self._put(np.zeros((b.num_requests, 0), np.int32)), 0)
        jax.block_until_ready(self.kv)

    def _put(self, tree):
        """Host numpy -> arrays replicated over the mesh (global arrays across processes)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self._replicated)
        return jax.tree_util.tree_map(lambda x: parallel.place(x, self._replicated), tree)

    def _write_kv(self, b: Bucket, new_kv, slot_mapping):
        self.kv = self._program(("write", b.num_tokens), self._write, self.kv, new_kv,
                                slot_mapping)(self.kv, new_kv, slot_mapping)

    def _dummy_batch(self, b: Bucket):
        n = 1 if b.query_block == 1 else b.num_tokens
        md = self._metadata(b, [n], [n], [[0] * self.max_pages_per_request])
        return self._put((np.zeros(b.num_tokens, np.int32), md, np.zeros(b.num_requests, np.int32)))

    def _metadata(self, b: Bucket, query_lens, kv_lens, page_tables):
        return build_metadata(query_lens=query_lens, kv_lens=kv_lens, page_tables=page_tables,
                              page_size=self.page_size, num_tokens=b.num_tokens,
                              num_requests=b.num_requests,
                              num_pages_per_request=self.max_pages_per_request,
                              num_blocks=b.num_blocks, query_block=b.query_block)

    def _run_sampler(self, logits, t: SamplingTensors, ban, num_logprobs: int):
        rows = t.temperature.shape[0]
        static = dict(all_greedy=t.all_greedy, needs_penalties=t.needs_penalties,
                      num_logprobs=num_logprobs)
        key = ("sampler", rows, ban.shape[1], t.output_token_ids.shape, t.prompt_token_ids.shape,
               t.max_top_k, t.use_top_p, t.use_min_p, *static.values())
        return self._program(key, self._sample, logits, t, ban, **static)(logits, t, ban)

    # -- one step -----------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, params_of: dict[str, SamplingParams]) -> StepResult:
        """Run one scheduled step; sample for the entries whose step completes a prefill or decodes."""
        sched = out.scheduled
        inputs, prompt_rows, failed = self.prepare(out, params_of)
        if self.broadcast is not None:
            self.broadcast(inputs)
        res, prompt_out = jax.device_get(self.run(inputs))
        keep = np.array([i for i, s in enumerate(sched) if s.samples_token
                         and s.request_id not in failed], np.int64)
        pick = lambda x: None if x is None else np.asarray(x)[keep]
        prompt = {rid: (pos, tuple(np.asarray(x)[at:at + n] for x in prompt_out))
                  for rid, (pos, at, n) in prompt_rows.items()}
        return StepResult([sched[i].request_id for i in keep], pick(res.token_ids),
                          pick(res.logprobs), pick(res.top_logprob_ids), pick(res.top_logprobs),
                          pick(res.ranks), prompt, failed)

    def prepare(self, out: SchedulerOutput, params_of: dict[str, SamplingParams],
                ) -> tuple[StepInputs, dict, dict[str, str]]:
        """The step as host arrays; {request_id: (first prompt position, first row on T, rows)}
        of the requests that asked for prompt log-probs; and {request_id: why} of requests whose
        part of the step could not be built. No device work.

        One request's part must never fail the others: if building the sampling inputs fails,
        each request's part is built alone to find the culprits, whose rows then run greedy with
        nothing banned and no prompt log-probs; their tokens are dropped (`StepResult.failed`)."""
        sched = out.scheduled
        qlens = [s.num_new_tokens for s in sched]
        b = self.bucket_for(sum(qlens), len(sched), all(q == 1 for q in qlens))
        md = self._metadata(b, qlens, [s.end_position for s in sched], [s.page_ids for s in sched])
        ids = np.zeros(b.num_tokens, np.int32)
        ids[:sum(qlens)] = [t for s in sched for t in s.token_ids]
        last = np.cumsum(qlens) - 1  # each request's last token: where its next token is sampled
        logits_indices = np.zeros(b.num_requests, np.int32)
        logits_indices[:len(sched)] = last
        sp = [params_of[s.request_id] for s in sched]
        failed: dict[str, str] = {}
        try:
            parts = self._sampling_inputs(b, sched, sp)
        except Exception:  # noqa: BLE001 - isolated below, request by request
            for s, p in zip(sched, sp):
                try:
                    self._sampling_inputs(self._prefill_bucket(self.token_buckets[-1]), [s], [p])
                except Exception as e:  # noqa: BLE001 - reported as this request's error
                    failed[s.request_id] = f"{type(e).__name__}: {e}"
            if not failed:
                raise  # the batch as a whole, not one request: a step failure
            sp = [_FAILED_ROW if s.request_id in failed else p for s, p in zip(sched, sp)]
            parts = self._sampling_inputs(b, sched, sp, skip=set(failed))
        tensors, ban, targets, rows = parts
        num_logprobs = NUM_TOP_LOGPROBS if any(p.logprobs for p in sp) else 0
        return StepInputs(b, ids, md, logits_indices, tensors, ban, num_logprobs, targets), rows, failed

    def _sampling_inputs(self, b: Bucket, sched, sp: list[SamplingParams], skip=frozenset()):
        """(SamplingTensors, banned [R, k], prompt targets, prompt rows) of a step's requests;
        requests in `skip` ban nothing."""
        reqs = [s.request for s in sched]
        banned = [list(r.eos_token_ids | r.stop_token_ids)
                  if r.num_output_tokens < p.min_tokens and r.request_id not in skip else []
                  for r, p in zip(reqs, sp)]
        width = max((len(x) for x in banned), default=0)
        ban = np.full((b.num_requests, 1 << max(0, width - 1).bit_length() if width else 0), -1,
                      np.int32)
        for i, banned_ids in enumerate(banned):
            ban[i, :len(banned_ids)] = banned_ids  # ids were checked against V at submission
        tensors = SamplingTensors.from_params(
            sp, [r.num_output_tokens for r in reqs], [r.output_token_ids for r in reqs],
            [r.prompt_token_ids for r in reqs], self.config.vocab_size, pad_to=b.num_requests)
        targets, rows = self._prompt_targets(b, sched, sp)
        return tensors, ban, targets, rows

    def run(self, inputs: StepInputs) -> tuple[SamplerOutput, tuple | None]:
        """The device work of one step (every process runs it): forward, cache write, sampling,
        prompt log-probs when asked. Returns device arrays, replicated over the mesh."""
        b = inputs.bucket
        ids, md, li, tensors, ban = self._put((inputs.token_ids, inputs.md, inputs.logits_indices,
                                               inputs.sampling, inputs.banned))
        logits, new_kv, hidden = self._forward(b, ids, md, li)
        self._write_kv(b, new_kv, md.slot_mapping)
        res: SamplerOutput = self._run_sampler(logits, tensors, ban, inputs.num_logprobs)
        prompt_out = None
        if inputs.prompt_targets is not None:
            targets = self._put(inputs.prompt_targets)
            hl, el = self._head_leaves, self._embed_leaves
            prompt_out = self._program(("prompt_logprobs", b.num_tokens), self._prompt_logprobs,
                                       hl, el, hidden, targets)(hl, el, hidden, targets)
        return res, prompt_out

    def reset_cache(self):
        """A zeroed KV cache in place of one a failed step may have consumed (it is donated to
        every write): what it held is lost, so its requests must recompute."""
        self.kv = jax.tree_util.tree_map(
            lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self.kv)

    def check(self):
        """Run the smallest bucket on a dummy batch (it writes only page 0, the padding page) and
        wait for it: raises if the device can no longer run steps."""
        b = self.all_buckets()[0]
        ids, md, li = self._dummy_batch(b)
        logits, new_kv, _ = self._forward(b, ids, md, li)
        self._write_kv(b, new_kv, md.slot_mapping)
        jax.block_until_ready((logits, self.kv))

    def _prompt_targets(self, b: Bucket, sched, sp: list[SamplingParams]):
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


def _sample_program(logits, t: SamplingTensors, banned, *, all_greedy, needs_penalties,
                    num_logprobs, mesh: Mesh | None) -> SamplerOutput:
    """Sample one token per row. banned [R, k] (-1 = none) are stop tokens of rows still below
    min_tokens: they cannot be drawn, but log-probs stay those of the raw model distribution.

    With logits split over the vocabulary (tensor parallel), greedy steps without penalties
    or top log-probs never gather them (parallel.sharded_greedy); every other variant gathers
    the [R, V] logits once (R * V * 4 bytes: 12 MiB at 64 rows of a 49152 vocabulary) and runs
    the one sampler, so that sampled tokens do not depend on the mesh. mesh: given when the
    logits are split on V."""
    if mesh is not None:
        if all_greedy and not needs_penalties and not num_logprobs:
            return SamplerOutput(*parallel.sharded_greedy(logits, banned, mesh))
        logits = jax.lax.with_sharding_constraint(logits, parallel.replicated(mesh))
    if not banned.shape[1]:
        return sample(logits, t, all_greedy=all_greedy, needs_penalties=needs_penalties,
                      num_logprobs=num_logprobs)
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], banned.shape)
    cols = jnp.where(banned < 0, logits.shape[1], banned)
    masked = logits.at[rows, cols].set(-jnp.inf, mode="drop")
    out = sample(masked, t, all_greedy=all_greedy, needs_penalties=needs_penalties, num_logprobs=0)
    return SamplerOutput(out.token_ids, *token_logprobs(logits, out.token_ids, num_logprobs))


def _group_size(num_layers: int, target: int) -> int:
    """The divisor of num_layers nearest to target, so every group runs the same program."""
    return min((d for d in range(1, num_layers + 1) if num_layers % d == 0),
               key=lambda d: (abs(d - target), -d))


def pages_for_bytes(config: ModelConfig, page_size: int, dtype, num_bytes: int) -> int:
    """How many KV pages fit in `num_bytes` (K and V of every layer)."""
    per_page = 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * \
        jnp.dtype(dtype).itemsize
    return max(2, num_bytes // per_page)


__all__ = ["Bucket", "ModelRunner", "StepResult", "pages_for_bytes"]
