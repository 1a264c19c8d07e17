"""The per-rank model runner: the model shard, its KV cache, and the step protocol.

Rank 0 (the *leader*) decides every step: it broadcasts a ``step.Message`` (header, then payload)
and runs the step itself; every other rank (a *follower*) receives it and runs the same step on
its shards (``follow``). Only the leader gets logits: the vocabulary-parallel head gathers them
to rank 0 alone, in full, or for greedy steps as each row's argmax and log-probability.
"""

from __future__ import annotations

import time

import torch

from tensorpar.distributed.collectives import broadcast
from tensorpar.distributed.groups import ParallelContext
from tensorpar.dtypes import torch_dtype
from tensorpar.layers.attention import CAUSAL
from tensorpar.loading import build_model
from tensorpar.runtime import step as S
from tensorpar.runtime.kv_cache import KVCache


class ModelRunner:
    def __init__(self, spec, ctx: ParallelContext):
        self.spec, self.ctx = spec, ctx
        self.config = spec.config
        self.dtype = torch_dtype(spec.dtype)
        t = time.perf_counter()
        self.model = build_model(spec.source, ctx, self.dtype, progress=spec.progress and ctx.is_leader)
        self.load_s = time.perf_counter() - t
        self.cache: KVCache | None = None

    # ---- the leader's side ----------------------------------------------------------------------

    def send(self, message: S.Message):
        """Broadcast ``message`` and run it here; returns what the step gives the leader."""
        header = message.header()
        payload = None
        if S.Message.payload_size(header):
            payload = torch.tensor(message.payload(), dtype=torch.long, device=self.ctx.device)
        if self.ctx.world_size > 1:
            broadcast(torch.tensor(header, dtype=torch.long, device=self.ctx.device), self.ctx)
            if payload is not None:
                broadcast(payload, self.ctx)
        return self._execute(S.to_batch(header, payload))

    def allocate(self, slots: int, max_len: int) -> None:
        if self.cache is None or not self.cache.fits(slots, max_len):
            self.send(S.allocate(slots, max_len))

    # ---- every rank --------------------------------------------------------------------------------

    def _receive(self) -> S.Batch:
        header = broadcast(torch.empty(S.HEADER_SIZE, dtype=torch.long, device=self.ctx.device), self.ctx).tolist()
        n = S.Message.payload_size(header)
        payload = broadcast(torch.empty(n, dtype=torch.long, device=self.ctx.device), self.ctx) if n else None
        return S.to_batch(header, payload)

    @torch.no_grad()
    def _execute(self, batch: S.Batch):
        if batch.op == S.ALLOC:
            self.cache = None  # free the old cache before allocating the new one
            self.cache = KVCache(self.model.kv_cache_shape(), batch.alloc_slots, batch.kv_len, self.dtype,
                                 self.ctx.device)
            return None
        head = self.model.lm_head
        if batch.op == S.SCORE:
            logits = head.logits_to_leader(self.model(batch.ids, batch.attention))
            return None if logits is None else logits[0]  # [S, vocab] on the leader
        if batch.op != S.STEP:
            return None
        attn = batch.attention
        if attn.kind == CAUSAL:  # new sequences start in these slots
            for slot in range(attn.slot_start, attn.slot_start + batch.ids.shape[0]):
                self.cache.start(slot)
        last = self.model(batch.ids, attn, self.cache)[:, -1]  # [B, hidden]
        if batch.logits == S.GREEDY:
            return head.greedy_to_leader(last)  # (ids [B], logprobs [B]) on the leader
        return head.logits_to_leader(last)  # [B, vocab] on the leader

    def follow(self, until: tuple[int, ...] = (S.END,)) -> int:
        """Follower: run the leader's messages until it sends one of ``until``; return that op."""
        while True:
            batch = self._receive()
            if batch.op in until:
                return batch.op
            self._execute(batch)
