"""vLLM's offline API over tensorpar: a script written for vLLM runs with its import changed to
``from tensorpar.vllm import LLM, SamplingParams``.

    llm = LLM(model="smollm2-135m", tensor_parallel_size=2)
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, top_p=0.95))
    print(outputs[0].outputs[0].text)

The common arguments carry over with vLLM's meaning and defaults (``SamplingParams``: temperature
1.0, ``max_tokens`` 16, ``top_k`` -1 or 0 for none; structured output as
``structured_outputs=StructuredOutputsParams(json=...)`` or the older
``guided_decoding=GuidedDecodingParams(...)``: ``json``, ``json_object``, ``regex``, ``choice``,
``grammar``). ``LLM`` takes ``tensor_parallel_size``, ``pipeline_parallel_size``, ``dtype``,
``max_model_len``, ``max_num_seqs``, ``seed`` (the default seed of sampling requests that give
none), ``enable_prefix_caching``, ``block_size``, ``kv_cache_memory_bytes`` and
``generation_config``; ``trust_remote_code``, ``enforce_eager`` and ``gpu_memory_utilization`` are
accepted and change nothing (tensorpar runs no remote code, has no CUDA graphs to skip, and its KV
budget is ``kv_cache_memory_bytes``); any other argument is a ``TypeError`` naming it. ``generate``
and ``chat`` return ``RequestOutput``s whose ``outputs`` hold each choice's text, token ids,
finish reason, ``cumulative_logprob`` and, when ``logprobs`` is asked, per token a dict of
``Logprob``s: the chosen token's and the top ones', as vLLM gives them; ``prompt_logprobs``
likewise per prompt token (None for the first).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tensorpar.runtime.guided import GuidedDecoding
from tensorpar.runtime.llm import LLM as _LLM
from tensorpar.runtime.request import ranked
from tensorpar.runtime.sampling import SamplingParams as _Params

NO_EFFECT = ("trust_remote_code", "enforce_eager", "gpu_memory_utilization")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's constraint on the output: give one of them."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def guided(self) -> GuidedDecoding:
        given = [(k, v) for k, v in (("json_schema", self.json), ("regex", self.regex), ("choice", self.choice),
                                    ("grammar", self.grammar), ("json_object", self.json_object)) if v]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, grammar, json_object; got {len(given)}")
        kind, value = given[0]
        return GuidedDecoding(kind, None if kind == "json_object" else value)


GuidedDecodingParams = StructuredOutputsParams  # (vLLM's earlier name)


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 for the most likely token; None when not among the top ones asked for
    decoded_token: str | None = None


def SamplingParams(n: int = 1, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,  # noqa: N802
                   repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   min_p: float = 0.0, seed: int | None = None, stop: str | list[str] | None = None,
                   stop_token_ids: list[int] | None = None, ignore_eos: bool = False, max_tokens: int = 16,
                   min_tokens: int = 0, logprobs: int | None = None, prompt_logprobs: int | None = None,
                   logit_bias: dict[int, float] | None = None,
                   structured_outputs: StructuredOutputsParams | None = None,
                   guided_decoding: StructuredOutputsParams | None = None) -> _Params:
    """vLLM's ``SamplingParams`` (its names and defaults) as tensorpar's."""
    constraint = structured_outputs or guided_decoding
    return _Params(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed,
                   stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), ignore_eos=ignore_eos, n=n,
                   logprobs=logprobs or 0, prompt_logprobs=prompt_logprobs, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty, min_p=min_p,
                   logit_bias=tuple((logit_bias or {}).items()), stop_token_ids=tuple(stop_token_ids or ()),
                   min_tokens=min_tokens, guided=constraint.guided() if constraint is not None else None)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    cumulative_logprob: float | None = None
    logprobs: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: Any = None
    finished: bool = True


class LLM:
    """vLLM's ``LLM`` (module docstring)."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 256, seed: int | None = None,
                 enable_prefix_caching: bool = True, block_size: int = 16, kv_cache_memory_bytes: int | None = None,
                 generation_config: str = "auto", speculative_config: dict | None = None, **kwargs):
        unknown = [k for k in kwargs if k not in NO_EFFECT]
        if unknown:
            raise TypeError(f"tensorpar.vllm.LLM does not take {unknown[0]!r}")
        self.seed = seed
        self.llm = _LLM(model, max_num_seqs=max_num_seqs, tp=tensor_parallel_size, pp=pipeline_parallel_size,
                        dtype=dtype, max_model_len=max_model_len, prefix_caching=enable_prefix_caching,
                        block_size=block_size, kv_cache_memory=kv_cache_memory_bytes,
                        generation_config=generation_config, speculative_config=speculative_config)

    def _logprobs(self, c, asked: int) -> list[dict[int, Logprob]] | None:
        """vLLM's per-token logprobs: the chosen token's and the ``asked`` most likely ones'."""
        if not asked:
            return None
        out = []
        for token, own, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
            ranks = {t: r for r, (t, _) in enumerate(top, 1)}
            step = {t: Logprob(lp, r) for r, (t, lp) in enumerate(top, 1)}
            step.setdefault(token, Logprob(own, ranks.get(token)))
            out.append(step)
        return out

    @staticmethod
    def _prompt_logprobs(scored) -> list[dict[int, Logprob] | None] | None:
        """vLLM's ``prompt_logprobs``: None for the first token, then each token's and the top ones'."""
        if scored is None:
            return None
        return [None if step is None else {t: Logprob(v, r) for t, (v, r) in step.items()} for step in ranked(scored)]

    def _run(self, prompts: list, texts: list, sampling_params, chat: bool) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()]
        params = params * len(prompts) if len(params) == 1 else params
        if self.seed is not None:
            params = [p if p.seed is not None or p.greedy else replace(p, seed=self.seed) for p in params]
        done = self.llm.generate_full(prompts, params, chat).completions
        out = [RequestOutput(str(i), text, []) for i, text in enumerate(texts)]
        for c in done:
            r = out[c.prompt_index]
            r.prompt_token_ids, r.prompt_logprobs = list(c.prompt_token_ids), self._prompt_logprobs(c.prompt_logprobs)
            asked = params[c.prompt_index].logprobs
            r.outputs.append(CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                              sum(c.logprobs) if c.logprobs else 0.0, self._logprobs(c, asked)))
        return out

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a ``{"prompt": ...}`` or ``{"prompt_token_ids": [...]}`` dict, or a list of those."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        inputs, texts = [], []
        for p in prompts:
            if isinstance(p, dict):
                p = p["prompt_token_ids"] if "prompt_token_ids" in p else p["prompt"]
            inputs.append(p)
            texts.append(p if isinstance(p, str) else None)
        return self._run(inputs, texts, sampling_params, chat=False)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of ``{"role", "content"}``) or a list of them, through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run(conversations, [None] * len(conversations), sampling_params, chat=True)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

