"""Scheduling policies: small objects the scheduler consults for order and preemption. Host only.

A policy ranks requests: `key(request)` sorts ascending, first = most deserving. The scheduler
  - admits waiting requests in key order,
  - runs running requests in key order, and when pages run out preempts the running request
    with the LARGEST key (never one ranked before the request that needs the pages, which is
    what keeps the best-ranked request progressing: no livelock),
  - asks `preempts_for(waiting, running)` whether a waiting request that does not fit (pages or
    seats) may take the place of the worst running one.

    fcfs      arrival order; never preempts to admit (the scheduler's historical behaviour)
    priority  vLLM's meaning: lower `priority` first, ties by arrival; a waiting request
              preempts running ones of strictly larger priority value (as vLLM V0's
              `_schedule_priority_preemption`)
    fair      VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024): a
              virtual token counter per client, charged w_p per prompt token at admission and
              w_q per generated token (w_p=1, w_q=2 as in the paper); the client with the least
              service goes first; a client that becomes active is lifted to the smallest counter
              of the active clients, so idle time banks no credit. Every `interval` steps the
              ranking is applied to the running batch too (FastSwitch, arXiv 2411.18424:
              periodic priority updates, preempting by swap), when the gap exceeds `margin`.
"""

from __future__ import annotations

from typing import Protocol

from jaxserve.sched.request import Request


class Policy(Protocol):
    name: str

    def key(self, request: Request) -> tuple: ...

    def preempts_for(self, waiting: Request, running: Request) -> bool: ...

    def on_step(self) -> None: ...

    def on_add(self, request: Request, active: list[Request]) -> None: ...

    def on_admit(self, request: Request) -> None: ...

    def on_output(self, request: Request, num_tokens: int) -> None: ...


class FCFSPolicy:
    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.arrival_seq,)

    def preempts_for(self, waiting: Request, running: Request) -> bool:
        return False

    def on_step(self) -> None:
        pass

    def on_add(self, request: Request, active: list[Request]) -> None:
        pass

    def on_admit(self, request: Request) -> None:
        pass

    def on_output(self, request: Request, num_tokens: int) -> None:
        pass


class PriorityPolicy(FCFSPolicy):
    name = "priority"

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_seq)

    def preempts_for(self, waiting: Request, running: Request) -> bool:
        return waiting.priority < running.priority


class FairPolicy(FCFSPolicy):
    """VTC service counters per client (`Request.client_id`; None is one anonymous client)."""

    name = "fair"

    def __init__(self, *, prompt_weight: float = 1.0, output_weight: float = 2.0,
                 interval: int = 16, margin: float = 256.0):
        self.prompt_weight, self.output_weight = prompt_weight, output_weight
        self.interval = interval  # steps between re-rankings of the running batch
        self.margin = margin  # service gap (weighted tokens) that justifies a preemption
        self.counters: dict[str | None, float] = {}  # client -> weighted tokens served
        self._steps = 0

    def service(self, client: str | None) -> float:
        return self.counters.get(client, 0.0)

    def key(self, request: Request) -> tuple:
        return (self.service(request.client_id), request.arrival_seq)

    def preempts_for(self, waiting: Request, running: Request) -> bool:
        return (self._steps % self.interval == 0 and
                self.service(waiting.client_id) + self.margin < self.service(running.client_id))

    def on_step(self) -> None:
        self._steps += 1

    def on_add(self, request: Request, active: list[Request]) -> None:
        client = request.client_id
        if any(r.client_id == client for r in active):
            return  # already backlogged: its counter runs on
        others = [self.service(r.client_id) for r in active]
        if others:  # VTC's counter lift: a newly active client starts at the least served one
            self.counters[client] = max(self.service(client), min(others))
        else:
            self.counters.setdefault(client, 0.0)

    def on_admit(self, request: Request) -> None:
        if request.num_preemptions == 0:  # the prompt is charged once, not per recompute
            self.counters[request.client_id] = (self.service(request.client_id)
                                                + self.prompt_weight * request.num_prompt_tokens)

    def on_output(self, request: Request, num_tokens: int) -> None:
        self.counters[request.client_id] = (self.service(request.client_id)
                                            + self.output_weight * num_tokens)


POLICIES = {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "fair": FairPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)}, got {name!r}") \
            from None
