"""Plots of what the engine did, shared by the notebooks and the benchmarks (matplotlib: the
optional `notebook` extra, `pip install jaxserve[notebook]`).

    from jaxserve import viz
    viz.timeline(llm.step_records)                 # per step: batch, requests, KV pages, time
    viz.latency({"chunked": outs_a, "layered": outs_b})   # TTFT and TBT distributions
    viz.attention_heatmap(weights, tokens)         # one prompt's attention, per head
    fig.savefig("out.png")

Each function returns a matplotlib Figure (Jupyter shows it) and imports matplotlib when
called, so `import jaxserve` never does. Inputs are host data: `StepRecord`s (records.py),
`RequestOutput`s (their `metrics`), numpy arrays.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from jaxserve.outputs import RequestOutput
    from jaxserve.records import StepRecord

DECODE, PREFILL, STAGE = "#4c72b0", "#dd8452", "#c44e52"  # colors shared by the panels


@functools.cache
def _figure_class():
    from matplotlib.figure import Figure

    class PlotFigure(Figure):
        """A Figure not registered with pyplot (nothing global, no GUI backend, freed with its
        object) that Jupyter shows as a PNG: a bare Figure has no image repr unless pyplot's
        inline backend was set up first."""

        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=90)
            return buf.getvalue()

    return PlotFigure


def _figure(nrows: int, ncols: int = 1, *, figsize, sharex: bool = False):
    fig = _figure_class()(layout="constrained", figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharex=sharex)


def timeline(records: Sequence[StepRecord], *, title: str | None = None) -> Figure:
    """One column per engine step, four panels sharing the step axis:
    batch (decode and prefill tokens, stacked; a layered-prefill stage hatched, as its tokens
    divided by its number of stages: the all-layer tokens it is worth), requests
    (running, waiting, swapped; preemptions marked), KV pages (on device, in host memory; pages
    swapped out and in as bars) and step time."""
    if not records:
        raise ValueError("no step records: run with EngineConfig(record_steps=True)")
    fig, axes = _figure(4, 1, figsize=(9, 7.5), sharex=True)
    batch, reqs, pages, times = axes[:, 0]
    steps = np.array([r.step for r in records])
    col = lambda name: np.array([getattr(r, name) for r in records])  # noqa: E731

    decode, prefill = col("decode_tokens"), col("prefill_tokens")
    layered = np.array([r.prefill_stage is not None for r in records])
    batch.bar(steps, decode, width=1.0, color=DECODE, label="decode tokens")
    batch.bar(steps, np.where(layered, 0, prefill), width=1.0, bottom=decode, color=PREFILL,
              label="prefill tokens")
    if layered.any():  # a stage runs its tokens through L / G layers: drawn as tokens / G
        groups = np.array([r.prefill_stage[1] if r.prefill_stage else 1 for r in records])
        batch.bar(steps, np.where(layered, prefill / groups, 0), width=1.0, bottom=decode,
                  color=PREFILL, hatch="//", edgecolor=STAGE,
                  label="layered prefill stage (tokens / stages)")
    batch.set_ylabel("tokens")
    batch.legend(loc="upper right", fontsize=8)

    for name, color in (("num_running", DECODE), ("num_waiting", "#8c8c8c"),
                        ("num_swapped", "#937860")):
        reqs.step(steps, col(name), where="mid", color=color, label=name[4:])
    preempted = np.array([len(r.preempted) for r in records])
    hit = preempted > 0
    if hit.any():
        reqs.scatter(steps[hit], preempted[hit], marker="v", color=STAGE, zorder=3,
                     label="preempted")
    reqs.set_ylabel("requests")
    reqs.legend(loc="upper right", fontsize=8)

    pages.step(steps, col("pages_device"), where="mid", color=DECODE, label="on device")
    pages.step(steps, col("pages_host"), where="mid", color="#937860", label="in host memory")
    out, back = col("swapped_out"), col("swapped_in")
    if out.any() or back.any():
        pages.bar(steps, out, width=1.0, color=STAGE, alpha=0.6, label="swapped out")
        pages.bar(steps, -back, width=1.0, color="#55a868", alpha=0.6, label="swapped in (down)")
    pages.set_ylabel("KV pages")
    pages.legend(loc="upper right", fontsize=8)

    times.bar(steps, col("duration") * 1e3, width=1.0, color="#8c8c8c")
    times.set_ylabel("step ms")
    times.set_xlabel("engine step")
    if title:
        fig.suptitle(title)
    return fig


def _ecdf(ax, values_ms: np.ndarray, label: str):
    x = np.sort(values_ms)
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)


def latency(runs: Sequence[RequestOutput] | Mapping[str, Sequence[RequestOutput]], *,
            title: str | None = None) -> Figure:
    """Time to first token and time between tokens (of each request's first completion) as
    cumulative distributions in ms, one line per run; several runs compare on the same axes."""
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    fig, axes = _figure(1, 2, figsize=(9, 3.4))
    ttft_ax, tbt_ax = axes[0]
    for label, outputs in runs.items():
        ttft = np.array([o.metrics.time_to_first_token for o in outputs
                         if o.metrics.time_to_first_token is not None]) * 1e3
        tbt = np.array([d for o in outputs for d in o.metrics.time_between_tokens]) * 1e3
        if len(ttft):
            _ecdf(ttft_ax, ttft, f"{label} (p50 {np.median(ttft):.0f} ms)".strip())
        if len(tbt):
            _ecdf(tbt_ax, tbt, f"{label} (p50 {np.median(tbt):.0f} ms)".strip())
    for ax, name in ((ttft_ax, "time to first token"), (tbt_ax, "time between tokens")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of " + ("requests" if ax is ttft_ax else "tokens"))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def attention_heatmap(weights: np.ndarray, tokens: Sequence[str], *,
                      heads: Sequence[int] | None = None, title: str | None = None) -> Figure:
    """Attention weights of one layer, [H, T, T] (or one head, [T, T]), as heatmaps: row i is
    what token i attends to. `heads` picks which to draw (default: up to the first 4)."""
    weights = np.asarray(weights)
    if weights.ndim == 2:
        weights = weights[None]
    if weights.ndim != 3 or weights.shape[1] != weights.shape[2] or weights.shape[1] != len(tokens):
        raise ValueError(f"weights must be [H, T, T] or [T, T] with T = {len(tokens)} tokens; "
                         f"got shape {weights.shape}")
    heads = list(heads) if heads is not None else list(range(min(4, weights.shape[0])))
    t = len(tokens)
    size = min(4.0, 1.2 + 0.25 * t)
    fig, axes = _figure(1, len(heads), figsize=(size * len(heads), size))
    labels = [repr(s)[1:-1] for s in tokens]  # whitespace and newlines made visible
    for ax, h in zip(axes[0], heads):
        ax.imshow(weights[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(t), labels if ax is axes[0][0] else [""] * t, fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def logprobs(completion, *, max_tokens: int = 8, title: str | None = None) -> Figure:
    """The top alternatives at each of a completion's first `max_tokens` positions, as bars of
    probability, the sampled token's bar highlighted (run with SamplingParams(logprobs=k))."""
    if not completion.logprobs:
        raise ValueError("the completion has no log-probs: generate with SamplingParams(logprobs=k)")
    n = min(max_tokens, len(completion.logprobs))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = _figure(rows, cols, figsize=(2.6 * cols, 1.9 * rows))
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        chosen = completion.token_ids[i]
        ranked = sorted(completion.logprobs[i].items(), key=lambda kv: -kv[1].logprob)
        labels = [repr(lp.decoded_token)[1:-1] for _, lp in ranked]
        probs = np.exp([lp.logprob for _, lp in ranked])
        colors = [PREFILL if t == chosen else DECODE for t, _ in ranked]
        ax.barh(range(len(ranked)), probs, color=colors)
        ax.set_yticks(range(len(ranked)), labels, fontsize=8)
        ax.invert_yaxis()  # most likely on top
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{i}: '{labels[[t for t, _ in ranked].index(chosen)]}'", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def array_sharding(x, *, axes: tuple[int, int] = (0, 1), names: Sequence[str] | None = None,
                   title: str | None = None) -> Figure:
    """Which device holds which block of a sharded jax.Array, drawn over two of its axes (rows
    `axes[0]`, columns `axes[1]`); devices holding the same block (replicas) share a box."""
    shape = x.shape if x.ndim >= 2 else (1, *x.shape)
    axes = axes if x.ndim >= 2 else (0, 1)
    index_map = x.sharding.devices_indices_map(tuple(x.shape))
    blocks: dict[tuple, list[int]] = {}
    for device, index in index_map.items():
        index = index if x.ndim >= 2 else (slice(0, 1), *index)
        span = tuple(index[a].indices(shape[a])[:2] for a in axes)
        blocks.setdefault(span, []).append(device.id)
    fig, ax = _figure(1, 1, figsize=(4.5, 3.2))
    ax = ax[0, 0]
    from matplotlib.patches import Rectangle

    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    for k, (((r0, r1), (c0, c1)), devices) in enumerate(sorted(blocks.items())):
        ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, facecolor=palette[k % len(palette)],
                               edgecolor="white", linewidth=2))
        ax.text((c0 + c1) / 2, (r0 + r1) / 2, "dev " + ",".join(map(str, sorted(devices))),
                ha="center", va="center", color="white", fontsize=8)
    ax.set_xlim(0, shape[axes[1]])
    ax.set_ylim(shape[axes[0]], 0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    label = (lambda a: names[a]) if names else (lambda a: f"axis {a}")  # noqa: E731
    ax.set_xlabel(f"{label(axes[1])} ({shape[axes[1]]})")
    ax.set_ylabel(f"{label(axes[0])} ({shape[axes[0]]})")
    ax.set_title(title or f"{x.dtype}{list(x.shape)}: {x.sharding.spec}", fontsize=9)
    return fig


def page_selection(chosen: np.ndarray, positions: Sequence[int], *, page_size: int = 16,
                   title: str | None = None) -> Figure:
    """Which KV pages sparse decode reads as a request decodes: chosen [N, W] bool (one row per
    decode position, from `models.probe.sparse_selection`), drawn with positions across and page
    index up; pages not yet written are left blank, pages held but skipped are pale."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    chosen = np.asarray(chosen, bool)
    positions = np.asarray(list(positions))
    if chosen.ndim != 2 or chosen.shape[0] != len(positions):
        raise ValueError(f"chosen must be [N, W] with N = {len(positions)} positions; got shape "
                         f"{chosen.shape}")
    held = np.arange(chosen.shape[1])[None, :] <= (positions // page_size)[:, None]  # [N, W]
    state = np.where(chosen, 2, np.where(held, 1, 0)).T  # [W, N]: page up, position across
    fig, ax = _figure(1, 1, figsize=(8, 3.6))
    ax = ax[0, 0]
    cmap = ListedColormap(["#ffffff", "#d6dff0", DECODE])
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    ax.imshow(state, cmap=cmap, vmin=0, vmax=2, aspect="auto", origin="lower", interpolation="none",
              extent=(positions[0] - step / 2, positions[-1] + step / 2, -0.5, chosen.shape[1] - 0.5))
    ax.set_xlabel("position of the decoded token")
    ax.set_ylabel(f"KV page ({page_size} tokens)")
    ax.legend(handles=[Patch(color=DECODE, label="read"), Patch(color="#d6dff0", label="skipped")],
              loc="upper left", fontsize=8)
    share = chosen.sum() / held.sum()
    ax.set_title(title or f"pages read: {share:.0%} of those held", fontsize=10)
    return fig
