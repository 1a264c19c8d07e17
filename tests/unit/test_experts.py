"""``ExpertParallelMoE`` (``layers/experts.py``) against the plain ``models.blocks.MoE``, rank by
rank, with contexts that have no process group (the reduce dispatch: the all-to-all one needs real
groups, ``tests/integration/test_moe.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import tensorpar.layers.experts as experts_mod
import tensorpar.layers.linear as linear_mod
from tensorpar.distributed.groups import ParallelContext, single_process_context
from tensorpar.layers import ExpertParallelMoE
from tensorpar.loading import build_model
from tensorpar.loading.safetensors_source import SafetensorsSource
from tensorpar.models.blocks import MoE

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]  # 8 experts; 6 and a shared expert; 6 and a dense layer
CPU = torch.device("cpu")


def ctx(rank: int, world_size: int) -> ParallelContext:
    return ParallelContext(rank=rank, world_size=world_size, device=CPU, backend="none", group=None)


@pytest.fixture(scope="module")
def full_models(tiny_checkpoints):
    return {arch: build_model(SafetensorsSource(tiny_checkpoints[arch]), single_process_context()) for arch in ARCHS}


def tokens(cfg, seed: int) -> torch.Tensor:
    return torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))  # [B, S, hidden]


@pytest.mark.parametrize("arch", ARCHS)
def test_one_rank_equals_the_plain_mixture_and_counts_its_tokens(arch, full_models):
    model = full_models[arch]
    x = tokens(model.config, 0)
    for layer in model.model.layers:
        ep = layer.mlp
        if not isinstance(ep, ExpertParallelMoE):
            continue  # (Qwen3-MoE's dense layer)
        plain = MoE(model.config)
        plain.load_state_dict(ep.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(ep(x), plain(x), rtol=1e-5, atol=1e-5)  # (the weights' layouts differ)
        k = model.config.experts_per_token
        assert ep.counts.sum() == x.shape[0] * x.shape[1] * k and ep.counts.shape == (model.config.num_experts,)


@pytest.mark.parametrize("n, ep", [(2, 1), (2, 2), (3, 3), (4, 2), (4, 4)])
@pytest.mark.parametrize("arch", ARCHS)
def test_partial_sums_over_ranks_add_up_to_the_plain_mixture(arch, n, ep, tiny_checkpoints, full_models,
                                                             monkeypatch):
    """Whole experts (n = ep), split experts (ep = 1) and both (4 ranks, 2 sets); with the
    reductions made identities each rank returns its partial sum (the shared expert's joins it)."""
    for mod in (experts_mod, linear_mod):
        monkeypatch.setattr(mod, "reduce_from_tp", lambda x, c: x)
    monkeypatch.setattr(experts_mod, "all_reduce", lambda x, c: x)
    full = full_models[arch]
    layer = 0
    x = tokens(full.config, n)
    with torch.no_grad():
        want = full.model.layers[layer].mlp(x)
        got = torch.zeros_like(want)
        counts = []
        for rank in range(n):
            model = build_model(SafetensorsSource(tiny_checkpoints[arch]), ctx(rank, n), ep=ep)
            moe = model.model.layers[layer].mlp
            assert isinstance(moe, ExpertParallelMoE) and moe.whole == (n == ep)
            assert moe.shared_partial == moe.shared  # a shared expert split over the same group
            assert not moe.uses_all_to_all(10_000) or n == ep
            got += moe(x)
            counts.append(moe.counts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(c, counts[0]) for c in counts)  # every rank routes every token


def test_the_reduce_dispatch_reads_the_host_once_per_layer(full_models, monkeypatch):
    """One ``tolist`` per forward (the rows each expert gets), however many experts run here."""
    moe = full_models["mixtral"].model.layers[0].mlp
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("item() in the MoE forward"))
    with torch.no_grad():
        moe(tokens(full_models["mixtral"].config, 1))
    assert reads == [(moe.gate.out_features,)]


def test_no_model_module_imports_distributed():
    """``models/`` is single-device code: expert parallelism lives in ``layers/experts.py``."""
    root = Path(__file__).parents[2] / "src" / "tensorpar" / "models"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("tensorpar.distributed") for n in names), path.name
