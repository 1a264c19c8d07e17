"""One rank of an engine: its ``ModelRunner``, and on the leader the tokenizer, the input processor
and the ``EngineCore`` (scheduler, sampler, and the runner they drive).

``generate`` and ``score`` are collective: every rank calls them (a spawned rank because ``LLM``
sends the call to all; under torchrun because every rank's program makes it). The leader checks
the call (with no communication, so a bad call fails alike everywhere), schedules it to the end
and sends ``END``; followers follow its steps until then; every rank returns the same result.
"""

from __future__ import annotations

import time

import torch

from tensorpar.distributed.collectives import all_gather_object, broadcast_object
from tensorpar.distributed.groups import ParallelContext
from tensorpar.errors import TensorparError
from tensorpar.models.registry import model_module
from tensorpar.process import peak_rss_mb
from tensorpar.runtime import messages
from tensorpar.runtime.inputs import InputProcessor
from tensorpar.runtime.engine_core import EngineCore
from tensorpar.runtime.model_runner import ModelRunner
from tensorpar.runtime.request import Collector, GenerationResult, requests_for
from tensorpar.runtime.sampler import Sampler
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.scheduler import Scheduler
from tensorpar.runtime.spec import DEFAULT_MAX_NUM_SEQS, EngineSpec
from tensorpar.runtime.speculative import speculation_summary


def architecture_defaults(tokenizer, config) -> set[int]:
    """Give ``tokenizer`` the architecture's chat template when it has none (GGUF files of Gemma
    carry none); return the ids of the architecture's end tokens it knows (``EOS_TOKENS``:
    Gemma's turns end with ``<end_of_turn>``)."""
    if tokenizer is None:
        return set()
    arch = model_module(config)
    if getattr(tokenizer, "chat_template", None) is None and hasattr(arch, "CHAT_TEMPLATE"):
        tokenizer.chat_template = arch.CHAT_TEMPLATE
    ids = {tokenizer.convert_tokens_to_ids(t) for t in getattr(arch, "EOS_TOKENS", ())}
    return {i for i in ids if i is not None and i != tokenizer.unk_token_id}


def leader_inputs(spec: EngineSpec) -> tuple[object, set[int], InputProcessor]:
    """What reads requests, on an engine's leader or a front end without weights: the tokenizer
    (None when the checkpoint ships none), the end-of-sequence ids, the input processor."""
    config = spec.config
    tokenizer = spec.source.tokenizer(cache=spec.tokenizer_cache)
    eos = set(config.eos_token_ids) | architecture_defaults(tokenizer, config)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return tokenizer, eos, InputProcessor(tokenizer, config.vocab_size, spec.max_model_len, spec.model,
                                          spec.chat_template)


CACHE_COUNTS = ("prefix_cache_queries", "prefix_cache_hits", "preemptions")
SPEC_COUNTS = ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens", "spec_accepted_per_pos")


def _since(before: dict, after: dict, keys: tuple[str, ...]) -> dict:
    """``after``'s counts less ``before``'s (lists of counts element by element)."""
    out = {}
    for k in keys:
        a, b = after[k], before[k]
        out[k] = [x - (b[i] if i < len(b) else 0) for i, x in enumerate(a)] if isinstance(a, list) else a - b
    return out


class Worker:
    def __init__(self, ctx: ParallelContext, spec: EngineSpec, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS):
        self.ctx, self.spec = ctx, spec
        config = spec.config
        self.tokenizer = self.inputs = self.core = None
        t = time.perf_counter()
        if ctx.is_leader:  # the tokenizer first: a conversion's transient memory then does not stack on the weights
            self.tokenizer, eos, self.inputs = leader_inputs(spec)
        tokenizer_s = time.perf_counter() - t
        self.runner = ModelRunner(spec, ctx)
        self.info = {"backend": ctx.backend, "tokenizer_s": tokenizer_s, "weights_s": self.runner.load_s}
        budget = self._kv_blocks() if spec.kv_cache_memory is not None else None
        proposer = None
        if spec.speculative is not None:
            from tensorpar.runtime.speculative import proposer_for

            proposer = proposer_for(spec, self.runner, eos if ctx.is_leader else set())  # (collective: a draft's group)
        if ctx.is_leader:
            scheduler = Scheduler(self.tokenizer, eos, max_num_seqs, spec.max_model_len, spec.max_num_batched_tokens,
                                  spec.chunked_prefill, spec.block_size, spec.prefix_caching, budget,
                                  config.whole_prompts_from)
            self.core = EngineCore(self.runner, scheduler, Sampler(eos), proposer)

    def _kv_blocks(self) -> int:
        """KV-cache blocks for sequences within ``--kv-cache-memory`` on every rank (the fewest any
        rank can hold); refused when one sequence of ``max_model_len`` would not fit."""
        from tensorpar.distributed.launch import torchrun_env
        from tensorpar.runtime.memory_guard import kv_cache_bytes, show

        spec, env = self.spec, torchrun_env()
        per_block = self.runner.kv_block_bytes(spec.block_size)
        budget = kv_cache_bytes(spec.kv_cache_memory, env.local_world_size if env else spec.dims.world_size,
                                spec.device)
        blocks = min(all_gather_object(budget // per_block, self.ctx)) - 1  # (one block pads)
        need = -(-spec.max_model_len // spec.block_size)
        if blocks < need:
            raise TensorparError(f"--kv-cache-memory gives each rank {show(budget)}: {max(blocks, 0) * spec.block_size} "
                                 f"positions of KV cache, less than one sequence of --max-model-len "
                                 f"{spec.max_model_len} ({show((need + 1) * per_block)}); give more, or a shorter "
                                 "--max-model-len")
        return blocks

    # ---- collective calls ------------------------------------------------------------------------

    def _call(self, prepare, run):
        """Every rank returns (or raises) what the leader's ``run(prepare())`` gave."""
        start, busy = time.perf_counter(), self.runner.busy_s
        if self.ctx.is_leader:
            try:
                plan = prepare()
            except (ValueError, TensorparError) as e:
                plan = e
            result = plan if isinstance(plan, Exception) else run(plan)
            self.runner.execute(messages.Message(messages.END))
        else:
            self.runner.follow()
            result = None
        wall = time.perf_counter() - start
        stats = all_gather_object((peak_rss_mb(), (self.runner.busy_s - busy) / wall if wall else 0.0), self.ctx)
        result = broadcast_object(result, self.ctx)
        if isinstance(result, Exception):
            raise result
        if isinstance(result, GenerationResult):
            result.peak_rss_mb = [rss for rss, _ in stats]
            if self.spec.dims.pp > 1:
                result.stage_busy = [stats[s * self.spec.dims.tp][1] for s in range(self.spec.dims.pp)]
        return result

    def generate(self, prompts: list, params: list[SamplingParams], chat: bool = False) -> GenerationResult:
        """Completions of every prompt (text or token ids), ``params[i].n`` of prompt i, in order."""

        def prepare():
            if len(prompts) != len(params):
                raise ValueError("one SamplingParams per prompt is needed")
            if not prompts:
                raise ValueError("no prompts given")
            requests = []
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                ids = self.inputs.encode(prompt, chat)
                try:
                    self.inputs.check_length(len(ids), sp.max_new_tokens)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
                requests.append(requests_for(f"p{i}", ids, sp))
            return requests

        def run(requests):
            flat = [r for choices in requests for r in choices]
            core, sched = self.core, self.core.scheduler
            core.reserve(len(flat), max(len(r.prompt_token_ids) + r.params.max_new_tokens for r in flat))
            before, load, counts = dict(core.timings), self.runner.expert_load(), sched.stats()
            collect = Collector()
            for r in flat:
                sched.add(r, collect)
            while sched.has_work():
                core.step()
            t = {k: core.timings[k] - before[k] for k in before}
            after = sched.stats()
            completions = [collect.completion(r, j, i) for i, choices in enumerate(requests)
                           for j, r in enumerate(choices)]
            steps, positions = t["decode_steps"], t["decode_positions"]
            timings = {"prefill_s": t["prefill_s"], "decode_steps": steps,
                       "decode_s_per_token": t["decode_s"] / positions if positions else 0.0}
            return GenerationResult(completions, timings, experts=self.runner.expert_load(since=load),
                                    cache={k: after[k] - counts[k] for k in CACHE_COUNTS},
                                    speculation=speculation_summary(_since(counts, after, SPEC_COUNTS))
                                    if self.core.proposer is not None else {})

        return self._call(prepare, run)

    def score(self, prompts: list) -> list:
        """Full-vocabulary logits at every position of each prompt: [len(prompt), vocab] each."""

        def run(ids):
            return [self.core.score(p).float().cpu() for p in ids]

        return self._call(lambda: [self.inputs.encode(p) for p in prompts], run)

    def load_weights(self, path: str) -> float:
        """Every rank's weights replaced by those of the checkpoint at ``path`` (``EngineCore.load_weights``)."""
        return self._call(lambda: self.runner.checked_weights(path), lambda checked: self.core.load_weights(checked))

    def replica_digests(self, prompt: list[int]) -> list[dict]:
        """Collective: every rank's digests of what it holds replicated, scoring ``prompt`` once
        (``runtime.digests.replica_digests``)."""
        from tensorpar.runtime.digests import replica_digests

        return replica_digests(self.runner.model, lambda: self.score([prompt]), self.ctx)

    def follow_forever(self) -> None:
        """Follower of a serving leader: run its steps until it shuts the group down. The leader
        sends a keep-alive while idle, so a dead leader is still noticed."""
        self.runner.follow(until=(messages.SHUTDOWN,))
