"""Host-side scheduling: requests, KV page bookkeeping and the batch scheduler. Never imports jax.

    request.py       Request, its state machine (RequestStatus) and stop checks (FinishReason)
    page_manager.py  PageManager: free list, reference counts, hashed prefix cache with LRU reuse
    scheduler.py     Scheduler: continuous batching, chunked prefill, recompute or swap preemption
    step.py          SchedulerOutput: one step's batch entries, preemptions and KV swaps
    policies.py      fcfs / priority / fair (VTC): the order the scheduler admits and preempts in
    host_pool.py     HostPool: the bounded host-memory pages that swapped-out KV occupies
    layered.py       layered prefill: the in-flight prefill batch, one group of layers a step
"""

from jaxserve.sched.host_pool import HostPool
from jaxserve.sched.page_manager import (
    NULL_PAGE,
    OutOfPagesError,
    PageManager,
    PageManagerError,
    hash_page,
)
from jaxserve.sched.policies import POLICIES, FairPolicy, make_policy
from jaxserve.sched.request import (
    PENDING_TOKEN,
    FinishReason,
    InvalidRequestError,
    Request,
    RequestStatus,
)
from jaxserve.sched.scheduler import (
    PREEMPTION_MODES,
    PREFILL_POLICIES,
    DuplicateRequestError,
    RequestTooLongError,
    Scheduler,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
    UnknownRequestError,
)
from jaxserve.sched.step import PrefillStage, ScheduledRequest, SchedulerOutput, Swap

__all__ = [
    "NULL_PAGE",
    "PENDING_TOKEN",
    "POLICIES",
    "PREEMPTION_MODES",
    "PREFILL_POLICIES",
    "PrefillStage",
    "DuplicateRequestError",
    "FairPolicy",
    "HostPool",
    "FinishReason",
    "InvalidRequestError",
    "OutOfPagesError",
    "PageManager",
    "PageManagerError",
    "Request",
    "RequestStatus",
    "RequestTooLongError",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerError",
    "SchedulerOutput",
    "Swap",
    "UnknownRequestError",
    "hash_page",
    "make_policy",
]
