"""Training under tensor (+ sequence) and data parallelism equals single-process training.

Real process groups (spawned ranks, gloo + shared memory). The reference is the plain
single-device model with ``F.cross_entropy`` on the same full weights and the same batch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tensorpar.distributed.collectives import all_gather_object
from tensorpar.distributed.groups import single_process_context
from tensorpar.layers.pieces import model_pieces
from tensorpar.loading.loader import load_weights
from tensorpar.models.llama import LlamaForCausalLM
from tensorpar.train.init import random_source
from tensorpar.train.optim import lr_at
from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SEED = 3
TOKENS = torch.randint(0, 49152, (4000,), generator=torch.Generator().manual_seed(0))


def spec(**kw) -> TrainSpec:
    """A run resolved as ``tensorpar train`` resolves it (the tokens are given, so ``data`` need
    only be an existing file)."""
    base = dict(data=__file__, model="random-llama-tiny", steps=20, seq_len=32, batch=4, lr=3e-3,
                seed=SEED, timeout_s=120.0)
    return TrainSpec.resolve(TrainConfig(**{**base, **kw}))


def reference_model() -> LlamaForCausalLM:
    source = random_source("random-llama-tiny", SEED)
    model = LlamaForCausalLM(source.config)
    load_weights(model, source)
    return model


def full_grads(model) -> dict[str, torch.Tensor]:
    return {pp.full_name(pc): pc.local_view(pp.param.grad) for pp in model_pieces(model) for pc in pp.pieces}


def on_ranks(rank_pool, n: int, *args, worker=Trainer):
    """The module's group of ``n`` ranks, each given a new ``worker(ctx, *args)``."""
    ranks = rank_pool(n)
    ranks.rebuild(worker, args)
    return ranks


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def batch():
    trainer = Trainer(single_process_context(), spec(), TOKENS)
    return trainer.batch(1)


@pytest.fixture(scope="module")
def reference_grads(batch):
    model = reference_model()
    inputs, labels = batch
    logits = model.logits(model(inputs))
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    return full_grads(model)


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (3, False), (3, True)])
def test_gradients_match_single_process(tp, sp, batch, reference_grads, rank_pool):
    ranks = on_ranks(rank_pool, tp, spec(tp=tp, sp=sp), TOKENS)
    ranks.call("backward", *batch)
    grads = ranks.call("full_tensors", "grad")
    assert set(grads) == set(reference_grads)
    for name, ref in reference_grads.items():
        assert relative_error(grads[name], ref) < 1e-5, name
    # the global norm (--clip-grad-norm's) counts every element once: replicated norms and KV heads too
    assert ranks.call("norm") == pytest.approx(global_norm(reference_grads), rel=1e-6)


@pytest.fixture(scope="module")
def single_process_losses():
    trainer = Trainer(single_process_context(), spec(), TOKENS)
    return [r["loss"] for r in trainer.run_steps(20)]


def test_single_process_trainer_learns(single_process_losses):
    assert len(single_process_losses) == 20
    assert single_process_losses[-1] < single_process_losses[0] - 0.5


def test_accumulated_micro_batches_give_the_whole_batchs_steps(single_process_losses, rank_pool):
    """--grad-accum 2 (each replica's rows in two micro-batches), alone and beside --dp 2 (whose sums
    wait for the last micro-batch): the losses of whole-batch steps."""
    one = Trainer(single_process_context(), spec(grad_accum=2), TOKENS)
    losses = [r["loss"] for r in one.run_steps(5)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_process_losses[:5]), rtol=1e-6, atol=0)
    ranks = on_ranks(rank_pool, 2, spec(dp=2, grad_accum=2), TOKENS)
    losses = [r["loss"] for r in ranks.call("run_steps", 5)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_process_losses[:5]), rtol=1e-5, atol=0)


def test_the_held_out_loss_is_the_reference_models_at_every_layout(rank_pool):
    """--eval-every: the last tenth of the tokens, as windows, scored by the reference model."""
    one = Trainer(single_process_context(), spec(eval_every=1), TOKENS)
    inputs, labels = one.eval_rows
    assert inputs.shape == (12, 32) and torch.equal(inputs[0], TOKENS[3600:3632])  # windows of the last 400
    with torch.no_grad():
        model = reference_model()
        expected = float(F.cross_entropy(model.logits(model(inputs)).flatten(0, 1), labels.flatten()))
    got = one.evaluate()
    assert got["loss"] == pytest.approx(expected, rel=1e-6) and got["tokens"] == 12 * 32
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    ranks = on_ranks(rank_pool, 4, spec(tp=2, dp=2, sp=True, eval_every=1), TOKENS)
    assert ranks.call("evaluate")["loss"] == pytest.approx(expected, rel=1e-6)


def test_bf16_computes_in_bfloat16_over_float32_masters(single_process_losses, rank_pool):
    """--dtype bf16: losses near float32's (not equal: the products are bfloat16), weights, gradients
    and AdamW moments float32; tp=2 with sequence parallelism near tp=1."""
    one = Trainer(single_process_context(), spec(dtype="bfloat16"), TOKENS)
    losses = torch.tensor([r["loss"] for r in one.run_steps(5)])
    reference = torch.tensor(single_process_losses[:5])
    torch.testing.assert_close(losses, reference, rtol=2e-2, atol=0)
    assert not torch.equal(losses, reference)
    params = list(one.model.parameters())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert all(one.optimizer.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    ranks = on_ranks(rank_pool, 2, spec(tp=2, sp=True, dtype="bf16"), TOKENS)
    parallel = torch.tensor([r["loss"] for r in ranks.call("run_steps", 5)])
    torch.testing.assert_close(parallel, losses, rtol=1e-2, atol=0)


def test_schedule_clipping_and_decay_act_as_defined():
    """A warm-up then cosine to --min-lr, steps clipped to norm 0.1, decay on matrices only."""
    trainer = Trainer(single_process_context(), spec(lr_schedule="cosine", warmup_steps=2, min_lr=1e-4, steps=6,
                                                     clip_grad_norm=0.1, weight_decay=0.1), TOKENS)
    decayed, kept = trainer.optimizer.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in kept["params"])
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0 and kept["params"]
    steps = trainer.run_steps(6)
    # 3e-3 * s / 2, then 1e-4 + 2.9e-3 * (1 + cos(pi * (s - 2) / 4)) / 2
    assert [round(r["lr"], 8) for r in steps] == [0.0015, 0.003, 0.0025753, 0.00155, 0.0005247, 0.0001]
    assert [round(lr_at(s, 3e-3, 6, "linear", 2, 1e-4), 8) for s in range(1, 7)] == [
        0.0015, 0.003, 0.002275, 0.00155, 0.000825, 0.0001]
    norms = [r["grad_norm"] for r in steps]
    assert min(norms) > 0.1
    trainer.backward(*trainer.batch(7))
    before = trainer.norm()
    for p in trainer.sync.params:  # what train_step does with --clip-grad-norm 0.1
        p.grad.mul_(0.1 / (before + 1e-6))
    assert trainer.norm() == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("tp,dp,sp", [(2, 1, False), (2, 2, False), (2, 2, True)])
def test_twenty_steps_match_single_process(tp, dp, sp, single_process_losses, rank_pool):
    ranks = on_ranks(rank_pool, tp * dp, spec(tp=tp, dp=dp, sp=sp), TOKENS)
    losses = [r["loss"] for r in ranks.call("run_steps", 20)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_process_losses), rtol=1e-4, atol=0)


class DropoutProbe(Trainer):
    """Reports what each rank draws from its dropout streams and holds of the residual stream."""

    def draws(self):
        out = {}
        for stream in ("replicated", "sharded"):
            with self.rng.fork(stream):
                out[stream] = torch.rand(6)
        return all_gather_object(out, self.mesh.world)

    def hidden(self, inputs):
        with torch.no_grad():
            return all_gather_object(self.model(inputs), self.mesh.world)


def test_dropout_streams_differ_and_agree_where_they_must(batch, rank_pool):
    ranks = on_ranks(rank_pool, 4, spec(tp=2, dp=2, dropout=0.3), TOKENS, worker=DropoutProbe)
    draws = ranks.call("draws")
    hidden = ranks.call("hidden", batch[0][:2])
    rep, shd = [d["replicated"] for d in draws], [d["sharded"] for d in draws]
    # ranks 0,1 form replica 0 and 2,3 replica 1 (tp ranks adjacent)
    assert torch.equal(rep[0], rep[1]) and torch.equal(rep[2], rep[3]) and not torch.equal(rep[0], rep[2])
    assert len({tuple(t.tolist()) for t in shd}) == 4
    # residual dropout draws the same mask on both TP ranks, so their copies of the stream agree
    assert torch.equal(hidden[0], hidden[1])
    reference = reference_model()
    with torch.no_grad():
        assert not torch.allclose(hidden[0], reference(batch[0][:2]), atol=1e-3)  # dropout is on


class CrossEntropyProbe:
    """Vocabulary-parallel cross-entropy of one rank's slice of full logits."""

    def __init__(self, ctx):
        self.ctx = ctx

    def run(self, logits, target, smoothing):
        from tensorpar.layers import vocab_parallel_cross_entropy
        from tensorpar.partition import vocab_shard

        span = vocab_shard(logits.shape[-1], self.ctx.world_size, self.ctx.rank)
        local = logits[..., span.start : span.stop].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, span, logits.shape[-1], self.ctx,
                                            label_smoothing=smoothing)
        loss.sum().backward()
        return loss.detach(), all_gather_object(local.grad, self.ctx)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_vocab_parallel_cross_entropy_on_uneven_shards(smoothing, rank_pool):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=g) * 3  # 11 entries on 3 ranks: 4, 4, 3
    target = torch.randint(0, 11, (4, 6), generator=g)
    target[1, 3:] = -100
    loss, grads = on_ranks(rank_pool, 3, worker=CrossEntropyProbe).call("run", logits, target, smoothing)
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.flatten(0, 1), target.flatten(), reduction="none", label_smoothing=smoothing)
    ref.sum().backward()
    torch.testing.assert_close(loss.flatten(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads, dim=-1), full.grad, rtol=1e-5, atol=1e-7)


PADDED = dict(  # 9 heads on 3 KV heads: at TP=2 every rank has padded head slots and KV head 1 is
    # replicated; q/k/v/o and MLP biases; an untied head; a vocabulary that splits unevenly
    model_type="llama", vocab_size=97, hidden_size=72, intermediate_size=50, num_hidden_layers=2,
    num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=128,
    rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**PADDED), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("padded")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("sp", [False, True])
def test_gradients_with_padded_slots_biases_and_an_untied_head(sp, padded_checkpoint, rank_pool):
    from tensorpar.loading import open_source
    from tensorpar.partition import head_shard

    assert all(head_shard(9, 3, 2, r).padded for r in range(2))
    tokens = torch.randint(0, 97, (2000,), generator=torch.Generator().manual_seed(1))
    cfg = spec(model=str(padded_checkpoint), tp=2, sp=sp, seq_len=15, batch=3)
    inputs, labels = Trainer(single_process_context(), spec(model=str(padded_checkpoint), seq_len=15, batch=3),
                             tokens).batch(1)
    reference = LlamaForCausalLM(open_source(str(padded_checkpoint)).config)
    load_weights(reference, open_source(str(padded_checkpoint)))
    F.cross_entropy(reference.logits(reference(inputs)).flatten(0, 1), labels.flatten()).backward()
    expected = full_grads(reference)
    ranks = on_ranks(rank_pool, 2, cfg, tokens)
    ranks.call("backward", inputs, labels)
    grads = ranks.call("full_tensors", "grad")
    assert ranks.call("norm") == pytest.approx(global_norm(expected), rel=1e-6)  # padded slots not counted
    losses = [r["loss"] for r in ranks.call("run_steps", 4)]  # padded slots must stay zero
    assert set(grads) == set(expected)
    assert any(name.endswith("o_proj.bias") for name in grads) and "lm_head.weight" in grads
    for name, ref in expected.items():
        assert relative_error(grads[name], ref) < 1e-5, name
    single = Trainer(single_process_context(), spec(model=str(padded_checkpoint), seq_len=15, batch=3), tokens)
    expected_losses = [r["loss"] for r in single.run_steps(4)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-4, atol=0)


def test_packed_rows_score_each_example_as_if_alone(tmp_path, rank_pool):
    """--pack: six JSONL examples in fewer rows, whose losses (attention within each example,
    positions from 0 in each) are the examples' own; the same at tp=2 with SP (padded documents)."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": "Tensor parallelism splits weights. " * k}) + "\n"
                            for k in (1, 3, 2, 5, 1, 4)))
    alone = Trainer(single_process_context(), spec(data=str(data), seq_len=64, batch=2))
    packed = Trainer(single_process_context(), spec(data=str(data), seq_len=64, batch=2, pack=True))
    assert alone.tokens.ids.shape[0] == 6 and packed.tokens.ids.shape[0] == 2
    assert alone.tokens.learned == packed.tokens.learned  # each example's first token is learned in neither

    def total(trainer) -> float:
        with torch.no_grad():
            return float(trainer._loss(*trainer.tokens.rows(slice(None))[:2], torch.ones(()),
                                       *trainer.tokens.rows(slice(None))[2:]))

    assert total(packed) == pytest.approx(total(alone), rel=1e-6)
    losses = [r["loss"] for r in packed.run_steps(2)]
    ranks = on_ranks(rank_pool, 2, spec(data=str(data), seq_len=64, batch=2, pack=True, tp=2, sp=True), None)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ranks.call("run_steps", 2)]), torch.tensor(losses),
                               rtol=1e-6, atol=0)
