"""The pieces of the compiled programs that are not the model: the cache of compiled
executables (`Programs`), the split model (`Split`) and the sampler program."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxserve import parallel
from jaxserve.kernels import write_kv, write_summaries
from jaxserve.sampler import SamplerOutput, maybe_token_logprobs, sample
from jaxserve.sampling import SamplingTensors


class Programs:
    """Compiled executables by key (a program name and its bucket), compiled on first use and
    counted; host numpy arguments compile as arrays replicated over the mesh (`replicated`)."""

    def __init__(self, replicated):
        self.replicated = replicated
        # On CPU, every bf16 op rounds to bf16: XLA:CPU otherwise keeps some of a fusion's
        # intermediates in float32 (xla_allow_excess_precision), so bf16 results depended on
        # which ops shared a program, by 0.1-0.2 in log-prob on the default model across
        # layers_per_program values, enough to flip near-ties. Rounded, they agree for any
        # grouping and sit closer to HF's bf16 (which rounds every op); steps as fast
        # (docs/performance.md). float32 programs are unaffected.
        cpu = next(iter(replicated.device_set)).platform == "cpu"
        self.compiler_options = {"xla_allow_excess_precision": False} if cpu else None
        self.compiled: dict[tuple, jax.stages.Compiled] = {}
        self.seconds = 0.0  # wall time spent compiling (and lowering, inside deferred())
        self.compile_seconds: dict[tuple, float] = {}  # each program's compile (benchmarks/warmup.py)
        # inside deferred(): each new program lowered, and its compile under way in _pool
        self._deferred: dict[tuple, tuple[jax.stages.Lowered, concurrent.futures.Future]] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def get(self, key: tuple, jitted, *args, **static):
        """The executable for `key`. Inside `deferred()` a new program is only lowered, and what
        is returned computes nothing: it gives the program's abstract outputs (shapes, dtypes,
        shardings), so that warmup walks every step shape without running one."""
        exe = self.compiled.get(key)
        if self._deferred is not None:
            lowered = self._deferred[key][0] if key in self._deferred else None
            if exe is None and lowered is None:
                lowered = jitted.lower(*self._spec(args), **static)
                self._deferred[key] = lowered, self._pool.submit(self._compile, key, lowered)
            info = (exe or lowered).out_info
            return lambda *_: info
        if exe is None:
            t0 = time.perf_counter()
            exe = self.compiled[key] = self._compile(key, jitted.lower(*self._spec(args), **static))
            self.seconds += time.perf_counter() - t0
        return exe

    def _compile(self, key: tuple, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        t0 = time.perf_counter()
        exe = lowered.compile(compiler_options=self.compiler_options)
        self.compile_seconds[key] = time.perf_counter() - t0
        return exe

    @contextlib.contextmanager
    def deferred(self, progress: bool):
        """Programs met inside are lowered and start compiling at once in a thread per CPU core
        (XLA compiles outside the GIL: 2x on this 2-core machine, and the lowering of the next
        program overlaps the compiles); on leaving, every compile is waited for."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        self._deferred = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
        try:
            yield
        finally:
            deferred, self._deferred = self._deferred, None
            with self._pool, tqdm(total=len(deferred), desc="Compiling", disable=not progress,
                                  unit="program") as bar:
                keys = {future: key for key, (_, future) in deferred.items()}
                for done in concurrent.futures.as_completed(keys):
                    self.compiled[keys[done]] = done.result()
                    bar.update()
            self._pool = None
        self.seconds += time.perf_counter() - t0

    def _spec(self, args):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=self.replicated) if isinstance(x, np.ndarray | np.generic)
            else x, args)


@dataclasses.dataclass(frozen=True)
class Split:
    """A module split once: its graph definition and the structure of its state leaves, merged
    back into a module inside a trace."""

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef

    @classmethod
    def of(cls, module: nnx.Module) -> tuple[Split, tuple[jax.Array, ...]]:
        graphdef, state = nnx.split(module)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        return cls(graphdef, treedef), tuple(leaves)

    def merge(self, leaves):
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))


def write_program(kv, summaries, new_kv, slot_mapping, *, mesh: Mesh | None, page_size: int):
    """The cache write: this step's K/V into the caches and, when sparse attention keeps them,
    its keys into the page summaries (kernels/sparse.py). Both are donated: scatters only, so
    both are updated in place."""
    kv = write_kv(kv, new_kv, slot_mapping, mesh=mesh)
    if summaries is not None:
        summaries = write_summaries(summaries, [k for k, _ in new_kv], slot_mapping,
                                    page_size=page_size, mesh=mesh)
    return kv, summaries


def sample_program(logits, t: SamplingTensors, banned, *, all_greedy, needs_penalties,
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
    return SamplerOutput(out.token_ids, *maybe_token_logprobs(logits, out.token_ids, num_logprobs,
                                                              t.want_logprobs))
