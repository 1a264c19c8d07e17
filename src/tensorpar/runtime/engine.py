"""The per-rank engine: the model shard, the KV cache, and the step protocol.

Rank 0 (the *leader*) tokenizes, schedules and samples. Before each model step it broadcasts
the step's plan (an op code and the token ids, positions and cache slots of every sequence);
every other rank (a *follower*) receives the plan and runs the same step on its shards. An
``END`` op closes a call, after which every rank returns the same result.

Every rank calls the same public method with the same arguments (the spawner sends the call to
every rank; under ``torchrun`` the user's program runs on every rank); followers ignore them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tensorpar.distributed.collectives import all_gather_object, broadcast, broadcast_object
from tensorpar.distributed.groups import ParallelContext
from tensorpar.distributed.launch import peak_rss_mb
from tensorpar.errors import TensorparError
from tensorpar.loading import build_model, open_source
from tensorpar.models.llama import KVCache
from tensorpar.runtime.sampling import SamplingParams, sample

OP_END, OP_LAST, OP_ALL, OP_ALLOC, OP_NOOP, OP_SHUTDOWN = 0, 1, 2, 3, 4, 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineSpec:
    """What every rank needs to build its engine (picklable: it travels to spawned ranks)."""

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    progress: bool = True

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of: auto, {', '.join(DTYPES)}") from None


@dataclass
class Completion:
    """One generated sequence."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class GenerationResult:
    completions: list[Completion]
    timings: dict[str, float]
    peak_rss_mb: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, spec: EngineSpec, ctx: ParallelContext):
        self.spec, self.ctx = spec, ctx
        self.source = open_source(spec.model)
        self.config = self.source.config
        # The tokenizer first: its transient peak (GGUF vocabulary conversion) then does not stack
        # on top of the loaded weights.
        self.tokenizer = self.source.tokenizer() if ctx.is_leader else None
        self.model = build_model(self.source, ctx, spec.torch_dtype(), progress=spec.progress and ctx.is_leader)
        self.cache: KVCache | None = None
        self.eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

    def backend(self) -> str:
        return self.ctx.backend

    # ---- the step protocol -------------------------------------------------------------------

    def _send(self, op: int, ids=None, positions=None, slots=None, kv_len: int = 0):
        """Leader: broadcast a plan, then run it here too."""
        dev = self.ctx.device
        if op in (OP_LAST, OP_ALL):
            ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
            positions = torch.as_tensor(positions, dtype=torch.long, device=dev)
            slots = torch.as_tensor(slots, dtype=torch.long, device=dev)
            B, S = ids.shape
        else:
            B, S = (0, 0) if slots is None else (slots, 0)
        if self.ctx.world_size > 1:
            broadcast(torch.tensor([op, B, S, kv_len], dtype=torch.long, device=dev), self.ctx)
            if op in (OP_LAST, OP_ALL):
                broadcast(torch.cat([ids.flatten(), positions.flatten(), slots]), self.ctx)
        return self._execute(op, ids, positions, slots, B, kv_len)

    def _receive(self):
        """Follower: the next plan from the leader."""
        dev = self.ctx.device
        header = broadcast(torch.empty(4, dtype=torch.long, device=dev), self.ctx).tolist()
        op, B, S, kv_len = header
        ids = positions = slots = None
        if op in (OP_LAST, OP_ALL):
            payload = broadcast(torch.empty(2 * B * S + B, dtype=torch.long, device=dev), self.ctx)
            ids, positions, slots = payload[: B * S].view(B, S), payload[B * S : 2 * B * S].view(B, S), payload[2 * B * S :]
        return op, ids, positions, slots, B, kv_len

    @torch.no_grad()
    def _execute(self, op, ids, positions, slots, B, kv_len):
        if op == OP_ALLOC:
            c = self.config
            kv_local = self.model.model.layers[0].self_attn.num_kv_heads
            self.cache = None  # free the old cache before allocating the new one
            self.cache = KVCache(c.num_layers, B, kv_local, kv_len, c.head_dim, self.spec.torch_dtype(), self.ctx.device)
            return None
        if op == OP_ALL:
            return self.model.logits(self.model(ids, positions))  # [B, S, vocab]
        if op == OP_LAST:
            for b in (positions[:, 0] == 0).nonzero().flatten().tolist():  # sequences that start here
                self.cache.start(int(slots[b]))
            hidden = self.model(ids, positions, self.cache, slots, kv_len)
            return self.model.logits(hidden[:, -1])  # [B, vocab]
        return None

    def follow(self, until: tuple[int, ...] = (OP_END,)) -> int:
        """Follower: run the leader's plans until it sends one of ``until``; return that op."""
        while True:
            op, ids, positions, slots, B, kv_len = self._receive()
            if op in until:
                return op
            self._execute(op, ids, positions, slots, B, kv_len)

    def follow_forever(self) -> None:
        """Follower of a serving leader: run steps until the leader shuts the group down. The
        leader sends a keep-alive (``OP_NOOP``) while idle, so a dead leader is still noticed."""
        self.follow(until=(OP_SHUTDOWN,))

    # ---- leader primitives for a scheduler (tensorpar.runtime.serving) ----------------------

    def allocate(self, slots: int, max_len: int) -> None:
        self._send(OP_ALLOC, slots=slots, kv_len=max_len)

    def step(self, ids: list[list[int]], positions: list[list[int]], slots: list[int], kv_len: int):
        """One model step over the given sequences; logits of each one's last token, [B, vocab]."""
        return self._send(OP_LAST, ids, positions, slots, kv_len=kv_len)

    def keepalive(self) -> None:
        self._send(OP_NOOP)

    def shutdown_followers(self) -> None:
        self._send(OP_SHUTDOWN)

    def _call(self, prepare, run):
        """Run one call on every rank: the leader validates (no communication), then steps;
        followers follow. Every rank returns (or raises) the same thing."""
        if self.ctx.is_leader:
            try:
                plan = prepare()
            except (ValueError, TensorparError) as e:
                plan = e
            result = plan if isinstance(plan, Exception) else run(plan)
            self._send(OP_END)
        else:
            self.follow()
            result = None
        rss = all_gather_object(peak_rss_mb(), self.ctx)
        result = broadcast_object(result, self.ctx)
        if isinstance(result, Exception):
            raise result
        if isinstance(result, GenerationResult):
            result.peak_rss_mb = rss
        return result

    def _ensure_cache(self, slots: int, max_len: int) -> None:
        if self.cache is None or not self.cache.fits(slots, max_len):
            self._send(OP_ALLOC, slots=slots, kv_len=max_len)

    # ---- public calls ---------------------------------------------------------------------------

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        """Token ids exactly as the model's Hugging Face tokenizer makes them by default."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
        elif self.tokenizer is None:
            raise ValueError(f"{self.source.path} ships no tokenizer: give prompts as lists of token ids")
        elif chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        return list(ids)

    def _decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: list, params: list[SamplingParams], chat: bool = False) -> GenerationResult:
        def prepare():
            if len(prompts) != len(params):
                raise ValueError("one SamplingParams per prompt is needed")
            if not prompts:
                raise ValueError("no prompts given")
            ids = [self.encode(p, chat) for p in prompts]
            limit = self.config.max_position_embeddings
            for i, (p, sp) in enumerate(zip(ids, params)):
                if len(p) + sp.max_new_tokens > limit:
                    raise ValueError(
                        f"prompt {i} has {len(p)} tokens; with max_new_tokens={sp.max_new_tokens} it exceeds "
                        f"the model's context of {limit} tokens"
                    )
            return ids

        return self._call(prepare, lambda ids: self._generate(ids, params))

    def score(self, prompts: list) -> list[torch.Tensor]:
        """Full-vocabulary logits at every position of each prompt: [len(prompt), vocab] each."""
        def prepare():
            return [self.encode(p) for p in prompts]

        def run(ids):
            return [
                self._send(OP_ALL, [p], [list(range(len(p)))], [0])[0].float().cpu() for p in ids
            ]

        return self._call(prepare, run)

    def _generate(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> GenerationResult:
        n = len(prompt_ids)
        self._ensure_cache(n, max(len(p) + sp.max_new_tokens for p, sp in zip(prompt_ids, params)))
        gens = []
        for sp in params:
            g = None
            if not sp.greedy:
                g = torch.Generator().manual_seed(sp.seed if sp.seed is not None else int(torch.seed() % 2**63))
            gens.append(g)
        outs: list[list[int]] = [[] for _ in range(n)]
        texts: list[str | None] = [None] * n
        reasons: list[str | None] = [None] * n

        def accept(i: int, token: int) -> None:
            outs[i].append(token)
            sp = params[i]
            if token in self.eos_ids and not sp.ignore_eos:
                reasons[i] = "stop"
            elif sp.stop and self.tokenizer is not None:
                text = self._decode(outs[i])
                hits = [text.find(s) for s in sp.stop if s in text]
                if hits:
                    texts[i], reasons[i] = text[: min(hits)], "stop"
            if reasons[i] is None and len(outs[i]) >= sp.max_new_tokens:
                reasons[i] = "length"

        t0 = time.perf_counter()
        for i, p in enumerate(prompt_ids):
            logits = self._send(OP_LAST, [p], [list(range(len(p)))], [i], kv_len=len(p))
            accept(i, sample(logits[0], params[i], gens[i]))
        t1 = time.perf_counter()
        steps = 0
        while active := [i for i in range(n) if reasons[i] is None]:
            pos = [len(prompt_ids[i]) + len(outs[i]) - 1 for i in active]
            logits = self._send(OP_LAST, [[outs[i][-1]] for i in active], [[q] for q in pos], active, kv_len=max(pos) + 1)
            for row, i in enumerate(active):
                accept(i, sample(logits[row], params[i], gens[i]))
            steps += 1
        t2 = time.perf_counter()
        completions = []
        for i in range(n):
            text = texts[i] if texts[i] is not None else self._decode(outs[i])
            completions.append(Completion(prompt_ids[i], outs[i], text, reasons[i]))
        return GenerationResult(
            completions,
            {"prefill_s": t1 - t0, "decode_s_per_token": (t2 - t1) / steps if steps else 0.0, "decode_steps": steps},
        )


def make_engine(ctx: ParallelContext, spec: EngineSpec) -> Engine:
    """The worker factory for spawned ranks (module level, so it pickles)."""
    return Engine(spec, ctx)
