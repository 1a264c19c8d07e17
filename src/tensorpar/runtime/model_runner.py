"""The per-rank model runner: the model shard, its KV cache, and the step protocol.

Rank 0 (the *leader*) decides every step: ``execute`` broadcasts a ``messages.Message`` (header,
then payload, on the CPU control channel) to every rank and runs the step itself; every other rank
(a *follower*) receives it and runs the same step on its shards (``follow``). Only the leader gets
the step's ``StepOutput``: the vocabulary-parallel head gathers logits to the first rank of its
tensor-parallel group, in full, or for greedy steps as each row's argmax and log-probability.

With pipeline stages (``dims.pp > 1``; rank r is tensor-parallel rank r % tp of stage r // tp)
each stage holds its layers and their KV cache. A stage receives its input hidden states
[rows, tokens, hidden] from the rank of the same tensor-parallel index in the stage before, runs
its layers and sends their output on the same way: every rank of a stage holds the replicated
activations after its all-reduce, so each sends its own copy and no stage needs a broadcast
inside it. The last stage's first rank sends the step's result to the leader.

A decode step of several rows runs as ``pp`` micro-batches of rows: a stage sends one
micro-batch on without waiting and starts the next, so that the stages work at once (the first
and last micro-batches still leave ``pp - 1`` stages idle: the bubble).
"""

from __future__ import annotations

import time

import torch

from tensorpar.distributed.collectives import broadcast_control, isend, recv, send
from tensorpar.distributed.groups import ParallelContext
from tensorpar.distributed.mesh import build_mesh
from tensorpar.dtypes import torch_dtype
from tensorpar.errors import TensorparError
from tensorpar.layers import deterministic, fused
from tensorpar.loading import build_model
from tensorpar.partition import even_splits, stage_layers
from tensorpar.runtime import messages
from tensorpar.runtime.kv_cache import KVCache


class ModelRunner:
    def __init__(self, spec, ctx: ParallelContext):
        self.spec, self.ctx = spec, ctx
        self.config = spec.config
        self.dtype = torch_dtype(spec.dtype)
        dims = spec.dims
        self.pp, self.width = dims.pp, dims.width  # (width: the ranks of a stage, max(tp, ep))
        self.stage, self.tp_rank = dims.coordinates(ctx.rank)
        self.tp_ctx = ctx
        layers = None
        if self.pp > 1:  # tensor-parallel groups of adjacent ranks, one per stage
            self.tp_ctx = build_mesh(ctx, self.width, self.pp, spec.timeout_s).tp
            layers = stage_layers(self.config.num_layers, self.pp, self.stage)
        if ctx.device.type == "cpu":
            fused.available()  # the fused decode kernels: built on first use on this machine, then loaded
        deterministic.enable(spec.deterministic)  # (before the model is split: it sets the split)
        t = time.perf_counter()
        self.model = build_model(spec.source, self.tp_ctx, self.dtype, progress=spec.progress and ctx.is_leader,
                                 layers=layers, ep=dims.ep, attention_tp=dims.tp, moe_dispatch=spec.moe_dispatch,
                                 quantization=spec.quantization, quant_group=spec.quant_group)
        self.load_s = time.perf_counter() - t
        if spec.fault:
            from tensorpar.runtime.faults import apply_fault

            apply_fault(self.model, spec.fault)
        from tensorpar.layers.experts import ExpertParallelMoE

        self.moe_layers = [(int(name.split(".")[2]), m)  # (name: model.layers.<i>.mlp)
                           for name, m in self.model.named_modules() if isinstance(m, ExpertParallelMoE)]
        self.cache: KVCache | None = None
        self.draft: ModelRunner | None = None  # a speculative draft model's share, if this rank holds one
        self.busy_s = 0.0  # seconds spent computing steps (not waiting for another stage)

    def expert_load(self, since: dict | None = None) -> dict:
        """Per MoE layer of this rank's stage: ``tokens`` routed to each expert so far (or since
        the ``since`` figures were read), and the ``imbalance`` of the expert sets' loads (the
        busiest set's tokens over the mean; 1 is even)."""
        from tensorpar.partition import even_split

        tokens, imbalance, ep = {}, {}, self.spec.dims.ep
        before = (since or {}).get("tokens", {})
        for layer, moe in self.moe_layers:
            if moe.counts is None:
                continue
            counts = moe.counts.tolist()
            if layer in before:
                counts = [c - b for c, b in zip(counts, before[layer])]
            loads = [sum(counts[e] for e in even_split(len(counts), ep, g)) for g in range(ep)]
            tokens[layer] = counts
            imbalance[layer] = max(loads) * ep / sum(loads) if sum(loads) else 1.0
        return {"tokens": tokens, "imbalance": imbalance} if tokens else {}

    # ---- the leader's side ----------------------------------------------------------------------

    def execute(self, message: messages.Message) -> messages.StepOutput | None:
        """Broadcast ``message`` on the control channel and run it here; the step's output (None
        for a message that is no model step). The leader's batch comes from the message's own
        lists: nothing it decided is read back. A draft model's message (``model=DRAFT``) runs on
        the draft's runner."""
        header = message.header()
        payload = None
        if messages.Message.payload_size(header):
            payload = torch.tensor(message.payload(), dtype=torch.long)
        if self.ctx.world_size > 1:
            broadcast_control(torch.tensor(header, dtype=torch.long), self.ctx)
            if payload is not None:
                broadcast_control(payload, self.ctx)
        runner = self if message.model == messages.TARGET else self.draft
        return runner._execute(messages.to_batch(header, payload, self.ctx.device, table=message.table()))

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """A KV cache of ``num_blocks`` blocks on every rank (the old one, if any, dropped)."""
        self.execute(messages.allocate(num_blocks, block_size))

    def load_weights(self, checked: str) -> None:
        """Replace every rank's weights in place by those of the checkpoint ``checked`` (as
        ``checked_weights`` returned it: the same model, saved at any layout); each rank reads only
        its own slices, as at start-up. The KV cache's contents are then stale: the caller runs
        nothing on them again (``EngineCore.load_weights``)."""
        self.execute(messages.reload(checked))

    def checked_weights(self, path: str) -> str:
        """The checkpoint at ``path`` resolved, once it is known to hold this model; refused before
        any rank is told, if not."""
        from tensorpar.loading.open import open_source

        if self.spec.quantization != "none":
            raise TensorparError(f"weights cannot be reloaded into a model packed by --quantization "
                                 f"{self.spec.quantization}")
        try:
            source = open_source(path)
        except TensorparError:
            raise
        except Exception as e:  # (unreadable files, say: refused like any other checkpoint)
            raise TensorparError(f"cannot open {path[:200]!r}: {type(e).__name__}: {e}") from None
        differ = self.config.differences(source.config)
        if differ:
            raise TensorparError(f"{path} holds another model than the one loaded: {'; '.join(differ[:3])}")
        return str(source.path)

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV-cache block takes on this rank."""
        return KVCache.bytes_per_block(self.model.kv_cache_shape(), block_size, self.dtype)

    # ---- every rank --------------------------------------------------------------------------------

    def _receive(self) -> messages.Batch:
        """A follower's next batch: header and payload from the control channel (CPU tensors),
        then one copy of its ids, positions and block tables to the device."""
        header = broadcast_control(torch.empty(messages.HEADER_SIZE, dtype=torch.long), self.ctx).tolist()
        n = messages.Message.payload_size(header)
        payload = broadcast_control(torch.empty(n, dtype=torch.long), self.ctx) if n else None
        return messages.to_batch(header, payload, self.ctx.device)

    @torch.no_grad()
    def _execute(self, batch: messages.Batch) -> messages.StepOutput | None:
        if batch.op == messages.ALLOC:
            self.cache = None  # free the old cache before allocating the new one
            self.cache = KVCache(self.model.kv_cache_shape(), batch.num_blocks, batch.block_size, self.dtype,
                                 self.ctx.device)
            return None
        if batch.op == messages.RELOAD:
            from tensorpar.loading.loader import load_weights
            from tensorpar.loading.open import open_source

            load_weights(self.model, open_source(batch.path))
            return None
        if batch.op not in (messages.SCORE, messages.STEP):
            return None
        attn = batch.attention
        if batch.op == messages.STEP:
            self.cache.zero_through(batch.in_use)
        if self.pp == 1:
            return self._head(batch, self.model(batch.ids, attn, self.cache if batch.op == messages.STEP else None))
        sent, results = [], []
        for start, stop in self._micro_batches(batch):
            ids = batch.ids[start:stop]
            part = attn if stop - start == batch.ids.shape[0] else attn.rows(start, stop)
            hidden = None
            if self.stage > 0:  # [b, S, hidden] from the stage before
                hidden = recv(torch.empty(*ids.shape, self.config.hidden_size, dtype=self.dtype,
                                          device=self.ctx.device), self.ctx, self.ctx.rank - self.width)
            t = time.perf_counter()
            out = self.model(ids, part, self.cache if batch.op == messages.STEP else None, hidden=hidden)
            if self.stage < self.pp - 1:
                sent.append((isend(out, self.ctx, self.ctx.rank + self.width), out))
            else:
                results.append(self._head(batch, out))
            self.busy_s += time.perf_counter() - t
        for work, _ in sent:
            work.wait()
        if self.stage < self.pp - 1:
            return self._result_from_last_stage(batch)
        if self.tp_rank == 0:
            send(_packed(_joined(results)), self.ctx, 0)
        return None

    def _micro_batches(self, batch: messages.Batch) -> list[tuple[int, int]]:
        """Row spans: ``pp`` of them for a decode step of at least ``pp`` rows, else one."""
        rows, tokens = batch.ids.shape
        if batch.op != messages.STEP or tokens != 1 or rows < 2:
            return [(0, rows)]
        return [(r.start, r.stop) for r in even_splits(rows, min(self.pp, rows))]

    def _head(self, batch: messages.Batch, out: torch.Tensor) -> messages.StepOutput | None:
        """The step's output from the final hidden states, on the first rank of the (last) stage;
        None on its other ranks."""
        head = self.model.lm_head
        if batch.op == messages.SCORE:
            logits = head.logits_to_leader(out)
            return None if logits is None else messages.StepOutput(logits=logits[0])  # [S, vocab]
        last = batch.output_tokens(out)  # [output rows, hidden]
        if batch.logits == messages.GREEDY:
            best = head.greedy_to_leader(last)  # (ids [rows], logprobs [rows])
            return None if best is None else messages.StepOutput(ids=best[0], logprobs=best[1])
        logits = head.logits_to_leader(last)  # [rows, vocab]
        return None if logits is None else messages.StepOutput(logits=logits)

    def _result_from_last_stage(self, batch: messages.Batch) -> messages.StepOutput | None:
        """On the leader, the step's output as the last stage's first rank sent it; None elsewhere."""
        if not self.ctx.is_leader:
            return None
        tokens = batch.ids.shape[1]
        rows = len(batch.outputs) if batch.outputs is not None else (batch.ids.numel() if batch.every else
                                                                        sum(p.positions.shape[0] for p in batch.parts))
        greedy = batch.op == messages.STEP and batch.logits == messages.GREEDY
        shape = (2, rows) if greedy else ((tokens if batch.op == messages.SCORE else rows), self.config.vocab_size)
        got = recv(torch.empty(shape, dtype=torch.float32, device=self.ctx.device), self.ctx,
                   (self.pp - 1) * self.width)
        return messages.StepOutput(ids=got[0].long(), logprobs=got[1]) if greedy else messages.StepOutput(logits=got)

    def follow(self, until: tuple[int, ...] = (messages.END,)) -> int:
        """Follower: run the leader's messages until it sends one of ``until``; return that op. A
        draft model's messages run on its runner (``draft``), where this rank holds a part of it."""
        while True:
            batch = self._receive()
            if batch.op in until:
                return batch.op
            runner = self if batch.model == messages.TARGET else self.draft
            if runner is not None:
                runner._execute(batch)

    # ---- a speculative draft model --------------------------------------------------------------

    def attach_draft(self, spec) -> None:
        """Hold a share of the draft model ``spec`` describes (``runtime.speculative``): on the first
        ``spec.dims.tp`` ranks, which form its group; every rank must call this (the group is made
        collectively). Its messages travel on this runner's control channel."""
        from tensorpar.distributed.mesh import leading_context

        ctx = leading_context(self.ctx, spec.dims.tp, self.spec.timeout_s)
        self.draft = ModelRunner(spec, ctx) if ctx is not None else None


def _packed(result: messages.StepOutput) -> torch.Tensor:
    """A step's output as one float32 tensor for the trip to the leader: greedy ids and
    log-probabilities as [2, B] (token ids below 2^24 are exact in float32), logits as they are."""
    if result.ids is not None:
        return torch.stack([result.ids.float(), result.logprobs.float()])
    return result.logits.float()


def _joined(results: list[messages.StepOutput]) -> messages.StepOutput:
    """Micro-batches' outputs as one step's (rows in order)."""
    if len(results) == 1:
        return results[0]
    if results[0].ids is not None:
        return messages.StepOutput(ids=torch.cat([r.ids for r in results]),
                                   logprobs=torch.cat([r.logprobs for r in results]))
    return messages.StepOutput(logits=torch.cat([r.logits for r in results]))
