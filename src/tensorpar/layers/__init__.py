"""Tensor-parallel building blocks: column/row-parallel linear, vocab-parallel embedding and LM head,
the expert-parallel mixture of experts."""

from tensorpar.layers.cross_entropy import vocab_parallel_cross_entropy
from tensorpar.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tensorpar.layers.experts import ExpertParallelMoE
from tensorpar.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    Segment,
    use_streaming_layout,
)

__all__ = [
    "ColumnParallelLinear",
    "ExpertParallelMoE",
    "RowParallelLinear",
    "Segment",
    "VocabParallelEmbedding",
    "ParallelLMHead",
    "use_streaming_layout",
    "vocab_parallel_cross_entropy",
]
