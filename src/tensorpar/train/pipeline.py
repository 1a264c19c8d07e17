"""Pipeline-parallel training: a replica's layers in ``pp`` stages, micro-batches in flight.

Stage k of ``pp * v`` runs the k-th even run of layers (``partition.stage_layers``) and lives on
pipeline rank ``k % pp``: one run per rank under 1F1B, ``v`` runs per rank (stages r, r + pp, ...)
under interleaved 1F1B (``--virtual-stages v``), which cuts the pipeline's idle start and end
(the bubble) from (pp - 1) / m to (pp - 1) / (v m) of a step of ``m`` micro-batches, for v times
the point-to-point sends. A rank builds one model holding all its runs (so parameter names,
checkpoints and gradient synchronization are the unsplit model's), and one ``StageChunk`` per run.

The schedules are torch's own (``torch.distributed.pipelining``: ``Schedule1F1B`` and
``ScheduleInterleaved1F1B``): they order the sends, receives, forwards and backwards of every
micro-batch without deadlock on any backend, and each stage's forward may run collectives of its
own tensor-parallel group inside. Their losses are not rescaled: each micro-batch's loss is its
share of the step's global mean (its token losses over the step's token count), so the
gradients add up to the whole batch's, as at every other degree.

A tied embedding is held twice, by the first stage (the embedding) and the last (the head): after
backward each copy's gradient is replaced by their sum (one all-reduce between the two), so both
copies take the same steps; the first stage's is the one saved and counted in the norm.
Evaluation, forward only, passes each batch along the stages with blocking sends
(``forward_loss``).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import nn

from tensorpar.distributed.collectives import all_reduce
from tensorpar.distributed.mesh import Mesh
from tensorpar.errors import TensorparError
from tensorpar.models.blocks import AttentionBatch
from tensorpar.partition import stage_layers


def chunk_layers(num_layers: int, pp: int, virtual: int, rank: int) -> list[range]:
    """The runs of layers pipeline rank ``rank`` holds: stages rank, rank + pp, ... of pp * virtual."""
    return [stage_layers(num_layers, pp * virtual, rank + v * pp) for v in range(virtual)]


def check_pipeline(num_layers: int, pp: int, virtual: int, micro_batches: int) -> None:
    """Refuse, before launch, a pipeline that cannot run: more stages than layers, fewer
    micro-batches than stages, or (interleaved) micro-batches in rounds that do not divide them."""
    stages = pp * virtual
    if virtual > 1 and pp == 1:
        raise TensorparError("--virtual-stages interleaves the stages of a pipeline: give --pp 2 or more")
    if stages > num_layers:
        raise TensorparError(f"--pp {pp} x --virtual-stages {virtual} is {stages} stages for the model's "
                             f"{num_layers} layers: at most one stage per layer")
    if pp > 1 and micro_batches < pp:
        raise TensorparError(f"a pipeline of {pp} stages needs at least {pp} micro-batches per step to keep each "
                             f"stage busy: --grad-accum {micro_batches} is too few")
    rounds = max(1, micro_batches // pp)
    if virtual > 1 and micro_batches % rounds:
        raise TensorparError(f"interleaved 1F1B runs micro-batches in rounds of --pp {pp}: --grad-accum "
                             f"{micro_batches} must be a multiple of {rounds} (e.g. {rounds * pp})")


def tied_copy(model: nn.Module, param: nn.Parameter) -> bool:
    """Whether ``param`` is a later stage's copy of the tied embedding (its head), which the
    first stage saves and counts."""
    head = getattr(model, "lm_head", None)
    return (model.config.tie_word_embeddings and not model.is_first and head is not None
            and param is getattr(head, "weight", None))


class StageChunk(nn.Module):
    """One pipeline stage on this rank: (token ids [B, S] ->) the embedding on the first, its run of
    layers, (the final norm and this rank's logits [B, S, vocab / tp] on the last)."""

    def __init__(self, model: nn.Module, layers: range, compute):
        super().__init__()
        self.model, self.layers, self.compute = model, layers, compute
        self.first, self.last = layers.start == 0, layers.stop == model.config.num_layers
        self.seq_len = 0  # the step's (padded) sequence length: a later stage's input holds only its shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        batch = AttentionBatch.fresh(x.shape[0], self.seq_len, x.device)
        with self.compute():
            if self.first:
                x = model.embed(x, batch)  # [B, S, hidden], or [B, S / tp, hidden] under sequence parallelism
            x = model.run_layers(x, batch, self.layers)
            if self.last:
                x = model.model.norm(x)
        if self.last:  # (float32 whatever the compute, as ``Trainer._compute`` says)
            return model.lm_head.local_logits(x.float())  # [B, S, vocab_local]
        return x


class Pipeline:
    """A rank's stages and their schedule; ``step`` and ``forward_loss`` are collective over the
    replica's pipeline (and each stage's tensor-parallel group)."""

    def __init__(self, model: nn.Module, mesh: Mesh, virtual: int, micro_batches: int, loss_fn, compute,
                 sequence_parallel: bool, timeout_s: float):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.model, self.mesh, self.loss_fn, self.sequence_parallel = model, mesh, loss_fn, sequence_parallel
        pp, rank = mesh.pp.world_size, mesh.pp.rank
        self.chunks = [StageChunk(model, layers, compute)
                       for layers in chunk_layers(model.config.num_layers, pp, virtual, rank)]
        stages = [PipelineStage(c, rank + v * pp, pp * virtual, mesh.tp.device, group=mesh.pp.group)
                  for v, c in enumerate(self.chunks)]
        self.first, self.last = self.chunks[0].first, self.chunks[-1].last
        if virtual == 1:
            self.schedule = Schedule1F1B(stages[0], micro_batches, loss_fn=self._loss, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=self._loss, scale_grads=False)
        self.ranks = dist.get_process_group_ranks(mesh.pp.group)  # global ranks of stages 0 .. pp-1
        self.tied, self.tied_group = None, None
        if model.config.tie_word_embeddings:  # a group of the first and last stage per (replica, tp rank)
            tp, dp = mesh.tp.world_size, mesh.dp.world_size
            for d in range(dp):
                for t in range(tp):
                    pair = [(d * pp) * tp + t, (d * pp + pp - 1) * tp + t]
                    group = dist.new_group(pair, timeout=datetime.timedelta(seconds=timeout_s))
                    if mesh.world.rank in pair:
                        self.tied_group = group
            self.tied = model.model.embed_tokens.weight if self.first else model.lm_head.weight if self.last else None
        self.count = None

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels, self.count)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this replica's rows in micro-batches; the gradients are left in
        the parameters, the loss (summed over micro-batches) returned on every stage."""
        self.count = count
        for c in self.chunks:
            c.seq_len = inputs.shape[1]
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.first else ()
        self.schedule.step(*args, target=labels if self.last else None, losses=losses if self.last else None)
        total = torch.stack(losses).detach().sum() if self.last else torch.zeros((), device=inputs.device)
        return all_reduce(total, self.mesh.pp)

    def tie_gradients(self) -> None:
        """The tied embedding's gradient, on both its copies: the sum of theirs."""
        if self.tied is not None and self.tied.requires_grad:  # (frozen under LoRA)
            if self.tied.grad is None:
                self.tied.grad = torch.zeros_like(self.tied)
            dist.all_reduce(self.tied.grad, group=self.tied_group)

    @torch.no_grad()
    def forward_loss(self, inputs: torch.Tensor, labels: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The loss of ``inputs`` (forward only, the whole rows at once), on every stage: each stage's
        output is sent on to the next (blocking: one pair of ranks talks at a time)."""
        pp, me = self.mesh.pp.world_size, self.mesh.pp.rank
        n = pp * len(self.chunks)
        x = inputs
        loss = torch.zeros((), device=inputs.device)
        for k in range(n):
            if k % pp != me:
                continue
            chunk = self.chunks[k // pp]
            chunk.seq_len = inputs.shape[1]
            if k > 0:
                x = torch.empty(self._hidden_shape(inputs), device=inputs.device)
                dist.recv(x, self.ranks[(k - 1) % pp], group=self.mesh.pp.group)
            x = chunk(x)
            if k < n - 1:
                dist.send(x.float().contiguous(), self.ranks[(k + 1) % pp], group=self.mesh.pp.group)
            else:
                loss = self.loss_fn(x, labels, count)
        return all_reduce(loss.detach(), self.mesh.pp)

    def _hidden_shape(self, inputs: torch.Tensor) -> tuple[int, int, int]:
        """[B, S, hidden] between stages, or [B, S / tp, hidden] under sequence parallelism."""
        rows = inputs.shape[1] // self.mesh.tp.world_size if self.sequence_parallel else inputs.shape[1]
        return inputs.shape[0], rows, self.model.config.hidden_size
