"""`LLM`: the offline API, as in vLLM.

    llm = LLM()                                   # the default model, SmolLM2-135M-Instruct
    llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32))
    llm.chat([{"role": "user", "content": "Hi!"}])
    for delta in llm.stream("Once upon a time"): print(delta, end="")

Synchronous and thread-free, so it works the same in scripts and in Jupyter (no event loop).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from jaxserve.config import EngineConfig
from jaxserve.engine import Engine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling import SamplingParams

Prompt = str | Sequence[int] | dict
Messages = list[dict]


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "float32",
                 max_model_len: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, progress: bool = True, mesh=None,
                 **engine_options):
        """Load `model` (an HF folder, a .gguf file or a `jaxserve convert`ed orbax folder; None =
        the default model) and compile its shape buckets. Further keyword options are
        `EngineConfig` fields (e.g. tensor_parallel_size=2); mesh: a jax.sharding.Mesh with a
        "tensor" axis to shard over instead."""
        self.engine = Engine(EngineConfig(
            model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, **engine_options), progress=progress,
            mesh=mesh)
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        self = cls.__new__(cls)
        self.engine, self._ids = engine, itertools.count()
        return self

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        """The live Flax NNX model the engine runs, parameters on the mesh: render it with
        `nnx.display(llm.model)` (treescope in a notebook), read or change its weights; the
        next generate / chat / stream runs the weights as they are then."""
        return self.engine.model

    @property
    def step_records(self):
        """The engine's per-step records (`jaxserve.records.StepRecord`) when the LLM was made
        with record_steps=True, else None."""
        return self.engine.step_records

    # -- generate / chat -------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 ) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or {"prompt" | "prompt_token_ids": ...}); the
        outputs come back in prompt order. priority: one per prompt, lower runs first (with
        scheduling_policy="priority", as in vLLM)."""
        return self._run(_as_prompt_list(prompts), sampling_params, use_tqdm, priority)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._chat_prompt(c, add_generation_prompt, chat_template_kwargs)
                   for c in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt | Messages, sampling_params: SamplingParams | None = None,
               ) -> Iterator[str]:
        """Yield the text of one completion as it is produced; a list of messages is a chat.
        Closing the iterator early aborts the request."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() streams one completion; got n={params.n}")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) and "role" in prompt[0]:
            prompt = self._chat_prompt(prompt, True, None)
        rid = self._add(_as_prompt_list(prompt)[0], params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)  # no-op once finished

    # -- internals ----------------------------------------------------------------------------

    def _chat_prompt(self, conversation: Messages, add_generation_prompt: bool, kwargs) -> list[int]:
        return self.engine.tokenizer.encode_chat(conversation, add_generation_prompt=add_generation_prompt,
                                                 **(kwargs or {}))

    def _add(self, prompt, params: SamplingParams, priority: int = 0) -> str:
        if not self.engine.has_unfinished_requests():  # between calls: pick up weight edits
            self.engine.runner.sync_weights()
        rid = str(next(self._ids))
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        self.engine.add_request(rid, prompt, params, priority=priority)
        return rid

    def _run(self, prompts: list, sampling_params, use_tqdm: bool,
             priority: Sequence[int] | None = None) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp, prio in zip(prompts, params, priority or [0] * len(prompts)):
                ids.append(self._add(p, sp, prio))
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt leaves no request behind
                self.engine.abort(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req") as bar:
            try:
                while any(r is None for r in results):
                    for out in self.engine.step():
                        if out.finished and out.request_id in order:
                            results[order[out.request_id]] = out
                            bar.update(1)
            except BaseException:  # e.g. KeyboardInterrupt in a notebook: free what we added
                for rid in ids:
                    self.engine.abort(rid)
                raise
        return results

    def __repr__(self) -> str:
        return f"LLM({self.engine!r})"

    def _repr_html_(self) -> str:  # notebooks: model, mesh, KV cache, requests
        from jaxserve.reprs import llm_html

        return llm_html(self)

    def kv_state(self):
        """The engine's KV pages per request and the page pool, as a snapshot (see kv_state.py)."""
        return self.engine.kv_state()


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one tokenized prompt
    return prompts
