"""A snapshot of the KV cache's bookkeeping: which pages each request holds, and the page pool.

    state = llm.kv_state()        # or engine.kv_state(); host data, taken between steps
    state                         # in Jupyter: each request's page table as a row of cells and
                                  # the whole pool as a grid (free, held, shared by the prefix cache)
    state.requests[0].page_ids    # the page table the attention kernel reads for that request

The snapshot copies what the scheduler and page manager hold (`sched/`), so it stays as it was
while the engine runs on. Host only, no jax.
"""

from __future__ import annotations

import dataclasses
import html

from jaxserve.sched import NULL_PAGE, Scheduler

_HELD, _SHARED, _FREE = "#4c72b0", "#55a868", "#e8e8e8"  # one request, several, none
_HOST = "#937860"  # a swapped request's page in host memory
_MAX_POOL_CELLS = 4096


@dataclasses.dataclass(frozen=True)
class RequestPages:
    request_id: str
    status: str  # "running", "waiting", "preempted", ...
    page_ids: tuple[int, ...]  # page table: page_ids[i] holds positions [i * S, (i + 1) * S)
    num_computed_tokens: int  # positions with KV in those pages
    num_cached_tokens: int  # of them, found in the prefix cache at admission
    host_page_ids: tuple[int, ...] = ()  # a swapped request's KV pages in host memory


@dataclasses.dataclass(frozen=True)
class KVState:
    num_pages: int  # P, page 0 (padding target) included
    page_size: int  # S
    ref_counts: tuple[int, ...]  # [P] requests whose page table lists each page
    requests: tuple[RequestPages, ...]  # running first, then waiting (no pages until admitted)

    @classmethod
    def of(cls, scheduler: Scheduler) -> KVState:
        pm = scheduler.page_manager
        reqs = tuple(RequestPages(r.request_id, r.status.value, tuple(r.page_ids),
                                  r.num_computed_tokens, r.num_cached_tokens,
                                  tuple(getattr(r, "host_page_ids", ())))
                     for r in (*scheduler.running, *scheduler.waiting))
        return cls(pm.num_pages, pm.page_size, tuple(pm.ref_count(p) for p in range(pm.num_pages)),
                   reqs)

    @property
    def num_used_pages(self) -> int:
        return sum(1 for c in self.ref_counts if c > 0)

    @property
    def num_shared_pages(self) -> int:
        return sum(1 for c in self.ref_counts if c > 1)

    def __str__(self) -> str:
        lines = [f"KV cache: {self.num_used_pages}/{self.num_pages - 1} pages of {self.page_size} "
                 f"slots in use ({self.num_shared_pages} shared)"]
        for r in self.requests:
            host = f", host pages {list(r.host_page_ids)}" if r.host_page_ids else ""
            lines.append(f"  {r.request_id} [{r.status}] {r.num_computed_tokens} tokens "
                         f"({r.num_cached_tokens} from the prefix cache): pages {list(r.page_ids)}"
                         f"{host}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"KVState(pages={self.num_used_pages}/{self.num_pages - 1} used, "
                f"page_size={self.page_size}, requests={len(self.requests)})")

    def _repr_html_(self) -> str:
        return f"<div>{html.escape(str(self).splitlines()[0])}</div>{self._tables_html()}" \
               f"{self._pool_html()}{_LEGEND}"

    def _tables_html(self) -> str:
        rows = []
        for r in self.requests:
            cells = "".join(self._page_cell(i, p, r) for i, p in enumerate(r.page_ids))
            cells += "".join(f"<span title='host page {p}' style='display:inline-block;"
                             f"min-width:2.2em;margin:1px;padding:0 2px;text-align:center;"
                             f"font-size:11px;color:white;background:{_HOST}'>h{p}</span>"
                             for p in r.host_page_ids)
            rows.append(f"<tr><td><b>{html.escape(r.request_id)}</b></td><td>{r.status}</td>"
                        f"<td>{r.num_computed_tokens}</td><td style='text-align:left'>{cells or '-'}"
                        f"</td></tr>")
        return ("<table><tr><th>request</th><th>status</th><th>tokens</th><th>page table</th></tr>"
                f"{''.join(rows)}</table>")

    def _page_cell(self, i: int, page: int, r: RequestPages) -> str:
        """One page of a request's table, filled in proportion to its slots holding KV."""
        filled = min(self.page_size, max(0, r.num_computed_tokens - i * self.page_size))
        color = _SHARED if self.ref_counts[page] > 1 else _HELD
        pct = 100 * filled // self.page_size
        title = f"page {page}: positions {i * self.page_size}..{(i + 1) * self.page_size - 1}, " \
                f"{filled}/{self.page_size} filled, held by {self.ref_counts[page]}"
        return (f"<span title='{title}' style='display:inline-block;min-width:2.2em;margin:1px;"
                f"padding:0 2px;text-align:center;font-size:11px;color:white;background:linear-"
                f"gradient(to right,{color} {pct}%,#9db0cf {pct}%)'>{page}</span>")

    def _pool_html(self) -> str:
        """Every page id as a small square: free, held by one request, or shared (a title on
        the pages in use only, so that a pool of thousands of pages stays a small page)."""
        counts = self.ref_counts[:_MAX_POOL_CELLS]
        cells = "".join(
            f"<i style='background:{'#000' if p == NULL_PAGE else _color(c)}'"
            + (f" title='page {p}: {c} holders'" if c else "") + "></i>"
            for p, c in enumerate(counts))
        more = "" if len(self.ref_counts) <= _MAX_POOL_CELLS else \
            f"<div>(first {_MAX_POOL_CELLS} of {len(self.ref_counts)} pages)</div>"
        return (f"<style>.jaxserve-pool i{{display:inline-block;width:8px;height:8px;margin:1px}}"
                f"</style><div class='jaxserve-pool' style='max-width:640px;line-height:0;"
                f"margin-top:6px'>{cells}</div>{more}")


def _color(count: int) -> str:
    return _FREE if count == 0 else _SHARED if count > 1 else _HELD


_LEGEND = (f"<div style='font-size:11px'><span style='color:{_HELD}'>&#9632;</span> held by one "
           f"request &nbsp;<span style='color:{_SHARED}'>&#9632;</span> shared (prefix cache) &nbsp;"
           f"<span style='color:{_HOST}'>&#9632;</span> in host memory (swapped) &nbsp;"
           f"<span style='color:#bbb'>&#9632;</span> free &nbsp;&#9632; page 0 (padding)</div>")
