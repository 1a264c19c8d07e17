"""One rank of a training run: tensor (+ sequence) parallel inside a pipeline stage, the stages
(``pipeline``) making a replica, data parallel across replicas.

Each step: the step's batch (the same at every degree, see ``data``), this replica's rows of it,
forward through the sharded model, vocabulary-parallel cross-entropy on this rank's logits,
backward, gradient synchronization (``grads.GradientSync``), and AdamW on the local shards.
AdamW is element-wise, so sharded moments updated from exact gradient slices are slices of the
single-process moments: the optimizer needs no communication.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tensorpar.distributed.collectives import all_gather_object, all_reduce, broadcast, broadcast_object
from tensorpar.distributed.dims import ParallelDims
from tensorpar.distributed.groups import DEFAULT_TIMEOUT_S, ParallelContext
from tensorpar.distributed.mesh import build_mesh, destroy_mesh
from tensorpar.dtypes import short_name
from tensorpar.errors import TensorparError
from tensorpar.layers import deterministic, deterministic_grads, vocab_parallel_cross_entropy
from tensorpar.layers.attention import AttentionBatch
from tensorpar.loading.loader import build_model, fill_parameter
from tensorpar.loading.tensorpar_checkpoint import ShardedCheckpointSource, find_checkpoint
from tensorpar.models.config import ModelConfig
from tensorpar.models.registry import architectures, checkpoint_shapes, for_model_type
from tensorpar.plans import set_sequence_parallel
from tensorpar.process import peak_rss_mb
from tensorpar.train.checkpoint import (gather_full_tensors, load_optimizer_state, resumed_lora, resumed_seed,
                                        save_checkpoint)
from tensorpar.train.data import (IGNORE_INDEX, Examples, batch_for_step, check_data, pad_sequence, read_examples,
                                  replica_rows, split_eval, tokenize_file)
from tensorpar.train.grads import GradientSync
from tensorpar.train.init import training_config, training_source
from tensorpar.train.lora import LoraConfig, attach_lora, lora_shapes
from tensorpar.train.optim import SCHEDULES, GlobalNorm, adamw, lr_at
from tensorpar.train.pipeline import Pipeline, check_pipeline, chunk_layers
from tensorpar.train.rng import ParallelRNG, set_dropout


@dataclass
class TrainConfig:
    """Everything a training run is defined by (``tensorpar train``'s flags)."""

    data: str | None = None
    model: str = "smollm2-135m"
    tp: int | None = None  # None: 1, or torchrun's world size / dp
    dp: int = 1
    pp: int = 1  # pipeline stages (``pipeline``)
    virtual_stages: int = 1  # runs of layers per pipeline rank: above 1, interleaved 1F1B
    sp: bool = False
    steps: int = 10
    seq_len: int = 128
    batch: int = 8
    lr: float = 3e-4
    lr_schedule: str = "constant"  # ``optim.lr_at``: constant, linear or cosine, after ``warmup_steps``
    warmup_steps: int = 0
    min_lr: float = 0.0
    clip_grad_norm: float | None = None  # the largest global gradient norm (``optim.GlobalNorm``)
    grad_accum: int | None = None  # micro-batches a step's rows are run in, their gradients summed (None: 1, or pp)
    eval_every: int = 0  # evaluate the held-out split every this many steps (and at the last); 0: never
    eval_split: float = 0.1  # the part of the data held out for evaluation (``data.split_eval``)
    dtype: str = "fp32"  # the forward and backward's compute: fp32, or bf16 (autocast; float32 masters, optimizer, sums)
    weight_decay: float = 0.0  # on matrices only (``optim.adamw``)
    lora_rank: int = 0  # above 0: train only LoRA adapters of this rank (``lora``), the model frozen
    lora_alpha: float | None = None  # None: the rank (a scale of 1)
    lora_targets: str = "q,v"
    pack: bool = False  # JSONL: several examples to a row, attention within each (``data.pack_rows``)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    label_smoothing: float = 0.0
    dropout: float = 0.0
    seed: int | None = None  # None: 0 for a new run, the checkpoint's seed when resuming
    save: str | None = None
    save_every: int = 0
    resume: str | None = None
    device: str = "cpu"
    timeout_s: float = 5 * DEFAULT_TIMEOUT_S
    deterministic: bool = False  # ``layers.deterministic``: the forward pass computed as the engine's, bit for bit

    def validate(self) -> None:
        defaulted = self.grad_accum is None
        if defaulted:
            self.grad_accum = self.pp if isinstance(self.pp, int) else 1
        for name in ("dp", "pp", "virtual_stages", "steps", "seq_len", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TensorparError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.lr <= 0:
            raise TensorparError(f"--lr must be positive, got {self.lr}")
        if self.lr_schedule not in SCHEDULES:
            raise TensorparError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise TensorparError(f"--warmup-steps must be >= 0 and --min-lr from 0 to --lr, got {self.warmup_steps!r}, "
                                 f"{self.min_lr!r}")
        try:
            self.dtype = short_name(self.dtype, ("fp32", "bf16"), "training --dtype")
        except ValueError as e:
            raise TensorparError(str(e)) from None
        if not isinstance(self.eval_every, int) or self.eval_every < 0 or not 0 < self.eval_split < 1:
            raise TensorparError(f"--eval-every must be >= 0 and --eval-split in (0, 1), got {self.eval_every!r}, "
                                 f"{self.eval_split!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise TensorparError(f"--clip-grad-norm must be positive, got {self.clip_grad_norm}")
        if self.save_every < 0:
            raise TensorparError(f"--save-every must be >= 0, got {self.save_every}")
        if self.save_every and not self.save:
            raise TensorparError("--save-every needs --save DIR (where the checkpoints go)")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise TensorparError(f"--lora-rank must be a non-negative integer, got {self.lora_rank!r}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise TensorparError(f"--weight-decay must be >= 0 and eps > 0, got {self.weight_decay}, {self.eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise TensorparError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TensorparError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        replica_rows(self.batch, self.dp, 0)
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1 or self.batch % (self.dp * self.grad_accum):
            raise TensorparError(f"--batch {self.batch} must split into --dp {self.dp} replicas of --grad-accum "
                                 f"{self.grad_accum} equal micro-batches"
                                 + (" (--grad-accum defaults to --pp)" if defaulted and self.pp > 1 else ""))
        if self.data is None:
            raise TensorparError("--data FILE.txt is required")
        if self.deterministic:
            why = [what for what, off in ((f"--device {self.device} (CPU only)", self.device == "cpu"),
                                          (f"--dp {self.dp} (at most 2)", self.dp <= 2),
                                          (f"--pp {self.pp}", self.pp == 1),
                                          ("--dropout", not self.dropout),
                                          (f"--grad-accum {self.grad_accum}", self.grad_accum == 1),
                                          (f"--dtype {self.dtype} (float32 only)", self.dtype == "fp32"),
                                          ("--label-smoothing", not self.label_smoothing),
                                          ("--lora-rank", not self.lora_rank)) if not off]
            if why:
                raise TensorparError("train --deterministic does not cover " + ", ".join(why) + " yet")
        if self.pack and not str(self.data).endswith(".jsonl"):
            raise TensorparError("--pack packs the examples of a JSONL file; a text file is one stream already")
        if self.pack and (self.pp > 1 or self.deterministic):
            raise TensorparError("--pack does not combine with " + ("--pp" if self.pp > 1 else "--deterministic") + " yet")
        if self.pp > 1 and self.dropout:
            raise TensorparError("train --pp does not cover --dropout yet (its masks would depend on the stages)")


@dataclass(frozen=True)
class TrainSpec:
    """A training run resolved once, before any rank starts: the degrees and the seed settled
    (``cfg.tp`` and ``cfg.seed`` are then set), the checkpoint found, the model's config read.
    Ranks trust it."""

    cfg: TrainConfig
    dims: ParallelDims
    config: ModelConfig
    model_name: str
    start_step: int = 0
    checkpoint: Path | None = None  # the checkpoint resumed from
    lora: LoraConfig | None = None  # the adapters trained, if any
    base: str | None = None  # under LoRA: the frozen model (name or path) the adapters sit on

    @classmethod
    def resolve(cls, cfg: TrainConfig, torchrun_world_size: int | None = None) -> "TrainSpec":
        cfg.validate()
        if not Path(cfg.data).is_file():
            raise TensorparError(f"training data {cfg.data!r} is not a file")
        checkpoint = None
        if cfg.resume == "auto":  # the newest complete checkpoint under --save; none yet: from the start
            if not cfg.save:
                raise TensorparError("--resume auto continues from --save DIR's newest checkpoint: give --save")
            done = [p for p in Path(cfg.save).glob("step-*") if (p / "metadata.json").is_file()]
            cfg = replace(cfg, resume=str(max(done, key=lambda p: p.name)) if done else None)
        if cfg.resume:
            checkpoint = find_checkpoint(cfg.resume)
            source = ShardedCheckpointSource(checkpoint)
            config, start, model = source.config, source.step, source.meta.get("model", str(checkpoint))
            seed = resumed_seed(source.meta, cfg.seed)
            lora = resumed_lora(source.meta, cfg)
            if start >= cfg.steps:
                raise TensorparError(
                    f"the checkpoint is at step {start}: --steps {cfg.steps} (the total) leaves nothing to run")
        else:
            config, start, model, seed = training_config(cfg.model), 0, cfg.model, 0 if cfg.seed is None else cfg.seed
            lora = LoraConfig.parse(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else None
            if cfg.save and any(Path(cfg.save).glob("step-*")):
                raise TensorparError(f"{cfg.save} already holds checkpoints of another run: continue it with "
                                     f"--resume {cfg.save}, or save a new run elsewhere")
        if not for_model_type(config.architecture).trainable:
            trainable = [t for a in architectures() if a.trainable for t in a.hf_model_types]
            raise TensorparError(f"training runs the Llama family ({', '.join(trainable)}); "
                                 f"{config.architecture} models run in generate, serve and bench only")
        dims = ParallelDims.resolve(config.num_heads, cfg.tp, cfg.dp, torchrun_world_size, supported=("tp", "pp", "dp"),
                                    pp=cfg.pp, num_layers=config.num_layers)
        check_pipeline(config.num_layers, dims.pp, cfg.virtual_stages, cfg.grad_accum)
        if cfg.deterministic and cfg.sp and dims.tp > 1 and cfg.seq_len % dims.tp:
            raise TensorparError(f"train --deterministic --sp needs a --seq-len that --tp {dims.tp} divides (padding would "
                                 f"move tokens in its sums), not {cfg.seq_len}")
        return cls(replace(cfg, tp=dims.tp, seed=seed), dims, config, model, start, checkpoint, lora,
                   model if lora else None)

    @property
    def sequence_parallel(self) -> bool:
        """Whether SP is in effect (it needs more than one tensor-parallel rank)."""
        return self.cfg.sp and self.dims.tp > 1


class Trainer:
    """The training state of one rank; every method is collective over all ranks."""

    def __init__(self, world: ParallelContext, spec: TrainSpec, tokens: torch.Tensor | None = None):
        cfg = self.cfg = spec.cfg
        self.spec, self.config, self.model_name = spec, spec.config, spec.model_name
        self.mesh = build_mesh(world, spec.dims.tp, spec.dims.dp, cfg.timeout_s, pp=spec.dims.pp)
        self.step_done = spec.start_step
        deterministic.enable(cfg.deterministic)  # (before the model is split: it sets the split)
        saved = ShardedCheckpointSource(spec.checkpoint) if spec.checkpoint else None
        source = saved if saved and not spec.lora else training_source(spec.base or cfg.model, cfg.seed)
        self.tokenizer = source.tokenizer() if world.rank == 0 else None
        pp = self.mesh.pp
        layers = None if pp is None else tuple(i for run in chunk_layers(self.config.num_layers, pp.world_size,
                                                                          cfg.virtual_stages, pp.rank) for i in run)
        self.model = build_model(source, self.mesh.tp, trainable=True, layers=layers)
        self.shapes = checkpoint_shapes(self.config)  # the trained tensors' full shapes
        if spec.lora:
            self.shapes = lora_shapes(self.config, spec.lora)
            attach_lora(self.model, spec.lora, cfg.seed,
                        fill=saved and (lambda pp: fill_parameter(pp, pp.param.data, saved, self.shapes)))
        set_sequence_parallel(self.model, spec.sequence_parallel)
        self.rng = ParallelRNG(cfg.seed, self.mesh.tp.rank, self.mesh.dp.rank, self.mesh.tp.device)
        set_dropout(self.model, cfg.dropout, self.rng, spec.sequence_parallel)
        self.optimizer = adamw(self.model, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        if spec.checkpoint:
            load_optimizer_state(self.optimizer, self.model, spec.checkpoint, self.step_done, self.shapes)
        self.sync = GradientSync(self.model, self.mesh, spec.sequence_parallel, self.shapes)
        self.norm = GlobalNorm(self.model, self.mesh.tp, self.mesh.pp)
        self.pipeline = None if pp is None else Pipeline(self.model, self.mesh, cfg.virtual_stages, cfg.grad_accum,
                                                         self._logits_loss, self._compute, spec.sequence_parallel,
                                                         cfg.timeout_s)
        self.tokens = self._tokens(tokens)
        self.eval_rows = None
        if cfg.eval_every:
            self.tokens, self.eval_rows = split_eval(self.tokens, cfg.eval_split, cfg.seq_len)

    def _tokens(self, tokens: torch.Tensor | None) -> "torch.Tensor | Examples":
        """The training data on every rank: given, or read by rank 0 and broadcast: a text file's
        token ids [N], or a JSONL file's ``Examples`` (sent as one [2, N, seq_len + 1] tensor)."""
        if tokens is not None:
            return tokens
        world, cfg = self.mesh.world, self.cfg
        shape: tuple | TensorparError = ()
        if world.rank == 0:
            try:
                if str(cfg.data).endswith(".jsonl"):
                    examples = read_examples(cfg.data, self.tokenizer, cfg.seq_len, self.tokenizer.eos_token_id, cfg.pack)
                    tokens = examples.stacked()
                    check_data(examples.ids.flatten(), 0, self.config.vocab_size, cfg.data)
                else:
                    tokens = tokenize_file(cfg.data, self.tokenizer)
                    check_data(tokens, cfg.seq_len, self.config.vocab_size, cfg.data)
                shape = tuple(tokens.shape)
            except TensorparError as e:
                shape = e
        shape = broadcast_object(shape, world)
        if isinstance(shape, TensorparError):
            raise shape
        ids = tokens if world.rank == 0 else torch.empty(shape, dtype=torch.long)
        ids = broadcast(ids.to(world.device), world).cpu()  # NCCL carries device tensors only
        return Examples.from_stacked(ids) if ids.ndim == 3 else ids

    # ------------------------------------------------------------------ one step

    def _loss(self, inputs: torch.Tensor, labels: torch.Tensor, count: torch.Tensor,
              documents: torch.Tensor | None = None) -> torch.Tensor:
        """These rows' share of the global mean token loss over the step's ``count`` tokens
        (``documents``: packed rows, attention within each document)."""
        if self.spec.sequence_parallel:
            inputs, labels, documents = pad_sequence(inputs, labels, self.mesh.tp.world_size, documents)
        if self.pipeline is not None:  # (forward only: training steps go through ``Pipeline.step``)
            return self.pipeline.forward_loss(inputs, labels, count)
        batch = None if documents is None else AttentionBatch.packed_documents(documents)
        with self._compute():
            hidden = self.model(inputs, batch)  # [B, S, hidden], or [B, S/tp, hidden] under sequence parallelism
        if deterministic.enabled():  # whole logits on every rank; the loss summed in one order
            losses = deterministic_grads.cross_entropy(self.model.lm_head(hidden), labels, IGNORE_INDEX)
            return deterministic_grads.total(losses) / count
        logits = self.model.lm_head.local_logits(hidden.float())  # [B, S, vocab_local], float32 (``_compute``)
        return self._logits_loss(logits, labels, count)

    def _logits_loss(self, logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """This rank's logits [B, S, vocab_local] -> their rows' token losses summed, over ``count``."""
        losses = vocab_parallel_cross_entropy(  # (in float32, whatever the compute dtype)
            logits.float(), labels, self.model.lm_head.span, self.config.vocab_size, self.mesh.tp,
            ignore_index=IGNORE_INDEX, label_smoothing=self.cfg.label_smoothing,
        )
        return losses.sum() / count

    def _compute(self):
        """The precision of the forward (and so of the backward): float32, or with ``--dtype bf16``
        bfloat16 products (torch's autocast) over float32 weights, whose gradients, data-parallel
        sums, AdamW state and checkpoints stay float32. The vocabulary projection stays float32 in
        both: its logits feed the loss directly (as its softmax does in every mixed-precision recipe)."""
        if self.cfg.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.mesh.tp.device.type, dtype=torch.bfloat16)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This replica's rows of step ``step``: (inputs, labels[, documents when packed])."""
        if isinstance(self.tokens, Examples):
            tensors = self.tokens.batch(self.cfg.seed, step, self.cfg.batch)
        else:
            tensors = batch_for_step(self.tokens, self.cfg.seed, step, self.cfg.batch, self.cfg.seq_len)
        rows = replica_rows(self.cfg.batch, self.mesh.dp.world_size, self.mesh.dp.rank)
        return tuple(t[rows].to(self.mesh.tp.device) for t in tensors)

    def backward(self, inputs: torch.Tensor, labels: torch.Tensor, documents: torch.Tensor | None = None):
        """Forward and backward on this replica's rows, in ``grad_accum`` micro-batches whose
        gradients add up; leaves synchronized gradients (summed over replicas once, after the last).
        Returns the step's global mean loss and its token count."""
        self.optimizer.zero_grad(set_to_none=True)
        self.sync.start()
        count = all_reduce((labels != IGNORE_INDEX).sum().float(), self.mesh.dp)  # the step's tokens
        if self.pipeline is not None:
            self.sync.accumulating(True)  # (the data-parallel sums wait for the last micro-batch)
            if self.spec.sequence_parallel:
                inputs, labels, _ = pad_sequence(inputs, labels, self.mesh.tp.world_size)
            total = self.pipeline.step(inputs, labels, count)
            self.sync()
            self.pipeline.tie_gradients()
            return float(all_reduce(total, self.mesh.dp)), int(count)
        n = self.cfg.grad_accum
        micro = list(zip(inputs.chunk(n), labels.chunk(n), [None] * n if documents is None else documents.chunk(n)))
        total = torch.zeros((), device=inputs.device)
        for i, (x, y, d) in enumerate(micro):
            self.sync.accumulating(i < len(micro) - 1)
            loss = self._loss(x, y, count, d)
            loss.backward()
            total += loss.detach()
        self.sync()
        return float(all_reduce(total, self.mesh.dp)), int(count)

    def train_step(self) -> dict:
        """Run the next optimizer step; returns its global mean loss, tokens and seconds."""
        step = self.step_done + 1
        self.rng.start_step(step)
        t0 = time.perf_counter()
        loss, tokens = self.backward(*self.batch(step))
        norm = self.norm()
        if self.cfg.clip_grad_norm is not None and norm > self.cfg.clip_grad_norm:
            for p in self.sync.params:
                p.grad.mul_(self.cfg.clip_grad_norm / (norm + 1e-6))
        lr = lr_at(step, self.cfg.lr, self.cfg.steps, self.cfg.lr_schedule, self.cfg.warmup_steps, self.cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_done = step
        seconds = time.perf_counter() - t0
        if self.cfg.save and self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.cfg.steps:
            self.save(self.cfg.save)
        return {"step": step, "loss": loss, "tokens": tokens, "seconds": seconds, "grad_norm": norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out rows' mean token loss and its perplexity, exp(loss), without dropout; each
        replica computes every ``dp``-th row, the sums are added over replicas."""
        mine = slice(self.mesh.dp.rank, None, self.mesh.dp.world_size)
        inputs, labels, *documents = (t[mine].to(self.mesh.tp.device) for t in self.eval_rows)
        self.model.eval()
        try:
            one, b = torch.ones((), device=inputs.device), self.cfg.batch
            total = sum((self._loss(inputs[i : i + b], labels[i : i + b], one, *(d[i : i + b] for d in documents))
                         for i in range(0, inputs.shape[0], b)), torch.zeros((), device=inputs.device))
        finally:
            self.model.train()
        count = all_reduce((labels != IGNORE_INDEX).sum().float(), self.mesh.dp)
        loss = float(all_reduce(total.detach().clone(), self.mesh.dp) / count)
        return {"step": self.step_done, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}

    def run_steps(self, n: int) -> list[dict]:
        """``n`` optimizer steps (see ``train_step``)."""
        return [self.train_step() for _ in range(n)]

    @torch.no_grad()
    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]] | None:
        """Each sequence's log p(token t | tokens before it), t = 1..n-1, as the current weights
        give them (on rank 0; None elsewhere): in deterministic mode bitwise equal to the
        ``prompt_logprobs`` an engine of the same weights returns at any degree (the same
        kernels, reductions and log-softmax), as reinforcement learning's importance ratios need."""
        if self.pipeline is not None:
            raise TensorparError("token log-probabilities are computed without pipeline stages (--pp 1)")
        out = []
        set_sequence_parallel(self.model, False)  # (whole sequences, no dropout)
        self.model.eval()
        try:
            for ids in sequences:
                x = torch.tensor([ids], dtype=torch.long, device=self.mesh.tp.device)
                logits = self.model.lm_head.logits_to_leader(self.model(x))  # [1, S, vocab] on rank 0
                if logits is not None:
                    logits = logits[0, :-1].float()  # [S - 1, vocab]
                    chosen = logits.gather(1, x[0, 1:, None].to(logits.device))[:, 0]
                    out.append((chosen - deterministic.logsumexp_rows(logits)).tolist())
        finally:
            set_sequence_parallel(self.model, self.spec.sequence_parallel)
            self.model.train()
        return out if self.mesh.world.rank == 0 else None

    # ------------------------------------------------------------------ state

    def save(self, root: str) -> str:
        extra = {"seed": self.cfg.seed, "model": self.model_name, "train_config": asdict(self.cfg)}
        if self.spec.lora:
            extra["lora"] = {**self.spec.lora.to_json(), "base": self.spec.base}
        path = save_checkpoint(root, self.step_done, self.mesh, self.model, self.optimizer, extra, self.tokenizer,
                               self.shapes)
        return str(path)

    def full_tensors(self, kind: str = "model") -> dict[str, torch.Tensor] | None:
        """Full tensors (checkpoint names) assembled on rank 0 from every rank's pieces: ``model``
        (the trained weights), ``grad``, ``exp_avg`` or ``exp_avg_sq``. None on other ranks."""
        return gather_full_tensors(self.model, self.optimizer, self.mesh, kind, self.shapes)

    def peak_rss_mb(self) -> list[float]:
        return all_gather_object(peak_rss_mb(), self.mesh.world)

    def close(self) -> None:
        destroy_mesh(self.mesh)
