"""SchedulerConfig and the scheduler's errors. Host only."""

from dataclasses import dataclass

from jaxserve.errors import JaxserveError
from jaxserve.sched.policies import POLICIES

PREEMPTION_MODES = ("recompute", "swap", "auto")
PREFILL_POLICIES = ("chunked", "layered")


class SchedulerConfigError(JaxserveError, ValueError):
    """A SchedulerConfig field is out of range or inconsistent with another."""


class RequestTooLongError(JaxserveError, ValueError):
    """The request can never run: longer than max_model_len, or more pages than the whole cache."""


class DuplicateRequestError(JaxserveError, ValueError):
    """A request with this id is already waiting or running."""


class UnknownRequestError(JaxserveError, LookupError):
    """No unfinished request has this id."""


class SchedulerError(JaxserveError, RuntimeError):
    """The scheduler was driven out of protocol (update without schedule, missing tokens)."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int  # KV cache pages, page 0 (reserved for padding) included
    page_size: int = 16  # token slots per page (S)
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens computed per step, decode and prefill together
    max_model_len: int = 2048  # prompt + max_tokens of any request
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority" | "fair" (policies.py)
    preemption_mode: str = "recompute"  # "recompute" | "swap" | "auto"
    # Host pool (pages) for swapped KV and the host prefix tier; 0: every preemption recomputes
    # and evicted prefix pages are forgotten.
    num_host_pages: int = 0
    host_prefix_cache: bool = True  # evicted prefix-cache pages go to the host pool (host_tier.py)
    # "auto" swaps a victim when pages * swap_seconds_per_page < tokens * recompute_seconds_per_token
    # (both measured by the runner); recompute otherwise.
    swap_seconds_per_page: float = 0.0
    recompute_seconds_per_token: float = 0.0
    # "chunked": prefill chunks share the decodes' batch; "layered": the prefill batch goes
    # through one group of layers per step (sched/layered.py), in as many stages as
    # `prefill_stages` gives its tokens: ((max tokens, stages), ...) ascending, the last
    # row's stages for anything longer.
    prefill_policy: str = "chunked"
    prefill_stages: tuple[tuple[int, int], ...] = ((512, 1), (1024, 2), (2048, 4), (4096, 8),
                                                   (1 << 62, 16))

    def __post_init__(self):
        minimums = {"num_pages": 2, "page_size": 1, "max_num_seqs": 1,
                    "max_num_batched_tokens": 1, "max_model_len": 1}  # fmt: skip
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value < minimum:
                raise SchedulerConfigError(f"{name} must be >= {minimum}, got {value}")
        if self.scheduling_policy not in POLICIES:
            raise SchedulerConfigError(f"scheduling_policy must be one of {sorted(POLICIES)}, "
                                       f"got {self.scheduling_policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise SchedulerConfigError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                                       f"got {self.preemption_mode!r}")
        if self.prefill_policy not in PREFILL_POLICIES:
            raise SchedulerConfigError(f"prefill_policy must be one of {PREFILL_POLICIES}, "
                                       f"got {self.prefill_policy!r}")
        if not self.prefill_stages or any(g < 1 for _, g in self.prefill_stages) or \
                [t for t, _ in self.prefill_stages] != sorted(t for t, _ in self.prefill_stages):
            raise SchedulerConfigError(f"prefill_stages must be (max tokens, stages >= 1) rows in "
                                       f"ascending order, got {self.prefill_stages}")
        if self.num_host_pages < 0:
            raise SchedulerConfigError(f"num_host_pages must be >= 0, got {self.num_host_pages}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # A recompute prefill covers up to max_model_len - 1 tokens and must fit one step.
            raise SchedulerConfigError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )

    def num_prefill_stages(self, num_tokens: int) -> int:
        """Stages (groups of layers, one per step) of a layered prefill batch of `num_tokens`."""
        return next((g for t, g in self.prefill_stages if num_tokens <= t), self.prefill_stages[-1][1])

    @property
    def max_pages_per_request(self) -> int:
        """Page-table width P the runner needs: pages of one max_model_len sequence."""
        return -(-self.max_model_len // self.page_size)
