"""What goes into the scheduler (``Request``) and what comes out (``TokenEvent``, ``Completion``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tensorpar.runtime.sampling import SamplingParams


@dataclass
class Request:
    """One sequence to generate: its prompt and how to sample (``params.n`` is 1: the choices of
    a prompt are separate requests, see ``requests_for``). ``emitted``: tokens it already generated
    and streamed elsewhere (an engine that failed): it resumes after them, computing prompt and
    ``emitted`` again as a preempted sequence does, and sends events only for what follows."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    emitted: list[int] = field(default_factory=list)


def requests_for(request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[Request]:
    """The ``params.n`` requests ``{request_id}-{i}`` of one prompt (``SamplingParams.choices``)."""
    return [Request(f"{request_id}-{i}", list(prompt_token_ids), p) for i, p in enumerate(params.choices())]


@dataclass
class TokenEvent:
    """One generated token of a request, or (``finished``) its end.

    Every token gets an event; the text it adds may be held back (an unfinished character, or
    what may begin a stop string) and arrive with a later one. The last token's event carries
    all remaining text; a final event with ``finished=True`` and no token follows it (and is the
    only event of a request that is aborted or fails before its first token).
    """

    request_id: str
    token_id: int | None  # None on the final event
    text_delta: str  # text added by this token (stop strings already cut off); "" when none
    logprob: float | None = None  # log-probability of token_id under the logits it was drawn from
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # [(token id, logprob)], best first
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" when finished
    error: str | None = None  # the message when finish_reason == "error"
    prompt_logprobs: "list[PromptToken] | None" = None  # on an event of its own, before any token
    cached_tokens: int | None = None  # on the first token's event: prompt tokens the prefix cache held
    admitted_at: float | None = None  # on the first token's event: when it started running (perf_counter)


PromptToken = tuple[int, float | None, list[tuple[int, float]]]  # (token id, its log-probability, top ones)


def ranked(scored: "list[PromptToken]", top_n: int | None = None) -> list[dict[int, tuple[float, int | None]] | None]:
    """Per prompt token: None for the first (nothing before it), else ``{token id: (log-probability,
    rank)}`` for the token itself and the ``top_n`` (default: all reported) most likely ones; rank 1
    is the most likely, None the token's own rank where it is not among them."""
    out = []
    for token, logprob, top in scored:
        if logprob is None:
            out.append(None)
            continue
        shown = top if top_n is None else top[:top_n]
        rank = {t: k for k, (t, _) in enumerate(top, 1)}
        out.append({token: (logprob, rank.get(token)), **{t: (v, rank[t]) for t, v in shown}})
    return out


def logsumexp(x):
    """torch's over the last dimension, or in deterministic mode the fixed-order one."""
    from tensorpar.layers.deterministic import logsumexp_rows

    return logsumexp_rows(x)


def score_prompt(logits, prompt: list[int], top: int) -> list[PromptToken]:
    """Per prompt token: its log-probability under the logits of the position before it (None
    for the first) and the ``top`` most likely tokens there. ``logits``: [len(prompt), vocab]."""
    import torch

    logits = logits.float()
    logp = logits[:-1] - logsumexp(logits[:-1]).unsqueeze(-1)  # [S - 1, vocab]
    ids = torch.tensor(prompt[1:], dtype=torch.long)
    own = logp.gather(1, ids[:, None])[:, 0].tolist()
    tops = [[] for _ in own]
    if top:
        values, indices = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [(prompt[0], None, [])] + [(t, lp, tp) for t, lp, tp in zip(prompt[1:], own, tops)]


Sink = Callable[[TokenEvent], None]


@dataclass
class Completion:
    """One generated sequence: choice ``index`` of prompt ``prompt_index``."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    index: int = 0
    prompt_index: int = 0
    prompt_logprobs: list[PromptToken] | None = None  # when asked for (``SamplingParams.prompt_logprobs``)
    logprobs: list[float] = field(default_factory=list)  # each generated token's log-probability
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked for


@dataclass
class GenerationResult:
    """What one ``generate`` call gives back: its completions, step timings, and each rank's peak memory."""

    completions: list[Completion]
    timings: dict[str, float]
    peak_rss_mb: list[float] = field(default_factory=list)
    stage_busy: list[float] = field(default_factory=list)  # per pipeline stage: fraction of the call spent computing
    experts: dict = field(default_factory=dict)  # a mixture of experts' load in this call (``ModelRunner.expert_load``)
    cache: dict = field(default_factory=dict)  # this call's prefix-cache queries and hits (tokens), and preemptions
    speculation: dict = field(default_factory=dict)  # drafts verified in this call (``speculative.speculation_summary``)


class Collector:
    """A sink that keeps the events of each request and assembles its ``Completion``."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, list[str]] = {}
        self.finish: dict[str, TokenEvent] = {}
        self.prompts: dict[str, list] = {}
        self.logprobs: dict[str, list[float]] = {}
        self.tops: dict[str, list] = {}

    def __call__(self, event: TokenEvent) -> None:
        rid = event.request_id
        if event.prompt_logprobs is not None:
            self.prompts[rid] = event.prompt_logprobs
        if event.token_id is not None:
            self.tokens.setdefault(rid, []).append(event.token_id)
            self.logprobs.setdefault(rid, []).append(event.logprob)
            self.tops.setdefault(rid, []).append(event.top_logprobs)
        self.text.setdefault(rid, []).append(event.text_delta)
        if event.finished:
            self.finish[rid] = event

    def completion(self, request: Request, index: int, prompt_index: int) -> Completion:
        rid = request.request_id
        end = self.finish[rid]
        if end.finish_reason == "error":
            from tensorpar.errors import TensorparError

            raise TensorparError(end.error or "generation failed")
        return Completion(request.prompt_token_ids, self.tokens.get(rid, []), "".join(self.text.get(rid, [])),
                          end.finish_reason, index, prompt_index, self.prompts.get(rid), self.logprobs.get(rid, []),
                          self.tops.get(rid, []) if request.params.logprobs else [])
