"""Host-side scheduling: requests, KV page bookkeeping and the batch scheduler. Never imports jax.

    request.py       Request, its state machine (RequestStatus) and stop checks (FinishReason)
    page_manager.py  PageManager: free list, reference counts, hashed prefix cache with LRU reuse
    scheduler.py     Scheduler: FCFS continuous batching, chunked prefill, recompute preemption
"""

from jaxserve.sched.page_manager import (
    NULL_PAGE,
    OutOfPagesError,
    PageManager,
    PageManagerError,
    hash_page,
)
from jaxserve.sched.request import FinishReason, InvalidRequestError, Request, RequestStatus
from jaxserve.sched.scheduler import (
    DuplicateRequestError,
    RequestTooLongError,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
    SchedulerOutput,
    UnknownRequestError,
)

__all__ = [
    "NULL_PAGE",
    "DuplicateRequestError",
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
    "UnknownRequestError",
    "hash_page",
]
