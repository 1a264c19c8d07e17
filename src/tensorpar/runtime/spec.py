"""What a user asks an engine for (``EngineArgs``), and what every rank is built from (``EngineSpec``).

``EngineArgs.resolve`` makes every check once, in the process that launches, before any rank
starts: the model is opened (its config and tensor index; no weights), the dtype named, the
parallel layout resolved against the model's heads and torchrun's world, the context bounded.
Ranks receive the ``EngineSpec`` (the opened checkpoint travels inside it, without its file
handles) and trust it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tensorpar.distributed import DEFAULT_TIMEOUT_S
from tensorpar.distributed.dims import ParallelDims
from tensorpar.dtypes import engine_dtype, torch_dtype, torch_name
from tensorpar.errors import TensorparError
from tensorpar.loading.open import DEFAULT_MODEL, open_source

if TYPE_CHECKING:
    from tensorpar.loading.sources import CheckpointSource
    from tensorpar.runtime.speculative import SpeculativeConfig

COMMS = ("auto", "gloo")
MOE_DISPATCHES = ("auto", "reduce", "all_to_all")  # ``layers.experts.ExpertParallelMoE``
DEFAULT_MAX_NUM_SEQS = 256  # sequences a scheduler runs at once; more wait for a slot
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256  # new tokens per model step (BENCHMARKS.md: chunked prefill)
DEFAULT_BLOCK_SIZE = 16  # positions per KV-cache block


@dataclass(frozen=True)
class EngineSpec:
    model: str  # as the user named it (the served model's name)
    source: "CheckpointSource"
    dims: ParallelDims
    dtype: str  # short name (``tensorpar.dtypes``)
    device: str
    comm: str
    timeout_s: float
    max_model_len: int
    progress: bool
    tokenizer_cache: bool
    startup: dict = field(default_factory=dict, compare=False)  # seconds, by phase
    layout: str = ""  # "tp=2 pp=2", or over torchrun's nodes "tp=2 within each node, pp=2 across 2 nodes"
    moe_dispatch: str = "auto"
    quantization: str = "none"
    quant_group: int = 32
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    chunked_prefill: bool = True
    fault: str = ""  # a fault injected on purpose (``runtime.faults``; tests only)
    kv_cache_memory: float | int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_caching: bool = True
    chat_template: str | None = None  # the template's text, when it replaces the tokenizer's
    sampling_defaults: dict = field(default_factory=dict)  # SamplingParams fields a request leaves out
    deterministic: bool = False  # logits bitwise equal at every degree (``layers.deterministic``)
    speculative: "SpeculativeConfig | None" = None  # speculative decoding (``runtime.speculative``)
    draft: "EngineSpec | None" = None  # the draft model's own spec, at its own degree

    @property
    def config(self):
        return self.source.config

    @property
    def use_shm(self) -> bool:
        return self.comm == "auto"

    @property
    def dtype_name(self) -> str:
        return torch_name(self.dtype)


@dataclass(frozen=True)
class EngineArgs:
    """The options of ``LLM``, ``ServingEngine`` and the engine commands.

    ``tp=None``: one rank per pipeline stage, or under torchrun its world size over ``pp``.
    ``pp``: pipeline stages, each a tensor-parallel group of ``tp`` ranks. ``dp``: independent
    replicas of that layout (serving only: ``ServingEngine`` and ``LLM`` run one). ``ep``: a
    mixture of experts' experts in that many sets over each stage's ranks (``ParallelDims``). ``dtype``: any name of
    ``tensorpar.dtypes`` or ``auto``. ``comm``: ``auto`` sends CPU collectives between ranks of
    one host through shared memory, ``gloo`` forces gloo. ``max_model_len``: the longest prompt
    plus completion (default: the model's context). ``tokenizer_cache``: keep a GGUF file's
    converted tokenizer in the user's cache directory. ``moe_dispatch``: how a mixture of experts
    sends tokens to the ranks of their experts, ``reduce``, ``all_to_all`` or ``auto``
    (``layers.experts``). ``quantization``: ``none`` (the checkpoint's weights as loaded),
    weight-only ``int8`` (per output row) / ``int4`` (in groups of ``quant_group`` inputs), packed
    by each rank after loading its shards, or ``gguf``: a GGUF file's own blocks, packed as read
    (``layers.quant``; CPU only). ``max_num_batched_tokens``: new tokens one model step runs at
    most (decode tokens first, then prompt tokens); ``chunked_prefill``: a prompt longer than what
    is left of that budget runs in chunks over several steps beside the running decodes, instead
    of whole (``runtime.scheduler``). ``max_memory``: bytes of weights one rank may hold; a
    layout that needs more, or more than the host has available, is refused before loading
    (``runtime.memory_guard``). ``kv_cache_memory``: the KV cache each rank holds, in bytes
    (an int) or as a fraction of the memory free after loading (a float in (0, 1]); by default
    room for ``max_num_seqs`` sequences of ``max_model_len`` (resident only as used). The cache
    is blocks of ``block_size`` positions; ``prefix_caching`` reuses the full blocks of a prompt's
    prefix computed before (``runtime.block_manager``). ``chat_template``: a Jinja chat template
    (a file, or the text itself) instead of the tokenizer's. ``generation_config``: where the
    sampling defaults of requests come from, as in vLLM: ``auto`` the model's
    ``generation_config.json``, ``vllm`` none (greedy ``LLM``, OpenAI's defaults when serving), or
    a folder or file of a ``generation_config.json``. ``speculative_config``: speculative decoding
    as vLLM configures it (a JSON object, as text or a dict: ``runtime.speculative``). ``lora_adapter``:
    a LoRA checkpoint of ``tensorpar train``, merged into ``model``'s weights as each rank loads its
    shard (``loading.lora_merge``). ``fault``: a fault injected on purpose, for tests (``runtime.faults``).
    """

    model: str = DEFAULT_MODEL
    tp: int | None = None
    pp: int = 1
    dp: int = 1
    ep: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    comm: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_model_len: int | None = None
    progress: bool = True
    tokenizer_cache: bool = True
    moe_dispatch: str = "auto"
    quantization: str = "none"
    quant_group: int = 32
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    chunked_prefill: bool = True
    fault: str = ""
    max_memory: int | None = None
    kv_cache_memory: float | int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_caching: bool = True
    chat_template: str | None = None
    generation_config: str = "auto"
    deterministic: bool = False
    speculative_config: "str | dict | None" = None
    lora_adapter: str | None = None

    def resolve(self, default_max_model_len: int | None = None) -> EngineSpec:
        """Check everything, open the model; ``default_max_model_len`` caps the context when
        ``max_model_len`` is not given."""
        from tensorpar.distributed.launch import torchrun_env

        if self.comm not in COMMS:
            raise TensorparError(f"comm must be 'auto' (shared memory between local CPU ranks) or 'gloo', got {self.comm!r}")
        from tensorpar.layers.quant import GROUPS, QUANTIZATIONS

        if self.quantization not in QUANTIZATIONS:
            raise TensorparError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization != "none" and self.device != "cpu":
            raise TensorparError(f"--quantization {self.quantization} runs on CPU kernels; on {self.device} use none")
        if self.quant_group not in GROUPS:
            raise TensorparError(f"--quant-group must be one of {', '.join(map(str, GROUPS))}, got {self.quant_group!r}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise TensorparError(f"moe dispatch must be one of {', '.join(MOE_DISPATCHES)}, got {self.moe_dispatch!r}")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
            raise TensorparError(f"--max-num-batched-tokens must be a positive integer, got {self.max_num_batched_tokens!r}")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise TensorparError(f"--block-size must be from 1 to 1024 positions, got {self.block_size!r}")
        budget = self.kv_cache_memory
        if budget is not None and not ((isinstance(budget, float) and 0 < budget <= 1)
                                       or (isinstance(budget, int) and budget > 0)):
            raise TensorparError(f"--kv-cache-memory must be a fraction in (0, 1] or a number of bytes, got {budget!r}")
        if self.fault:
            from tensorpar.runtime.faults import parse_fault

            parse_fault(self.fault)
        if not self.timeout_s or self.timeout_s <= 0:
            raise TensorparError(f"timeout must be positive, got {self.timeout_s!r}")
        dtype = engine_dtype(self.dtype, self.device)
        t = time.perf_counter()
        source = open_source(self.model)
        source.verify()  # a broken file fails here, in one line, before any rank starts
        if self.lora_adapter:
            from tensorpar.loading.lora_merge import LoraMergedSource

            if self.quantization == "gguf":
                raise TensorparError("--lora-adapter merges into float weights: use --quantization none, int8 or int4")
            source = LoraMergedSource(source, self.lora_adapter)
        metadata_s = time.perf_counter() - t
        if self.quantization == "gguf" and getattr(source, "gguf_architecture", None) is None:
            raise TensorparError(f"--quantization gguf keeps a GGUF file's own blocks; {self.model} is not a GGUF file "
                                 "(quantize it at load with --quantization int8 or int4)")
        config = source.config
        if self.deterministic:
            _check_deterministic(self, dtype, config)
        from tensorpar.runtime.speculative import SpeculativeConfig

        speculative = SpeculativeConfig.parse(self.speculative_config)
        env = torchrun_env()
        dims = ParallelDims.resolve(config.num_heads, self.tp, torchrun_world_size=env.world_size if env else None,
                                    supported=("tp", "pp", "dp", "ep"), pp=self.pp, dp=self.dp,
                                    ep=self.ep, num_experts=config.num_experts, num_layers=config.num_layers)
        if self.moe_dispatch == "all_to_all" and config.num_experts and dims.width > dims.ep:
            raise TensorparError(f"--moe-dispatch all_to_all sends tokens to whole experts, one rank each; at tp={dims.tp} "
                                 f"ep={dims.ep} each expert is split over {dims.width // dims.ep} ranks: use --tp "
                                 f"{dims.ep} or less, or --moe-dispatch reduce")
        from tensorpar.runtime.memory_guard import check_fits, weight_bytes_per_rank

        per_rank = weight_bytes_per_rank(source, dims, torch_dtype(dtype).itemsize, self.quantization, self.quant_group)
        check_fits(per_rank, env.local_world_size if env else dims.world_size, dims.describe(), self.max_memory,
                   self.device == "cpu")
        limit = config.max_position_embeddings
        if self.max_model_len is not None and not (isinstance(self.max_model_len, int) and 1 <= self.max_model_len <= limit):
            raise TensorparError(f"--max-model-len {self.max_model_len} must be from 1 to the model's context of {limit} tokens")
        max_model_len = self.max_model_len or min(limit, default_max_model_len or limit)
        draft = None
        if speculative is not None:
            if dims.pp > 1:
                raise TensorparError("--speculative-config with --pp is not supported yet: use tensor parallelism only")
            if speculative.method == "draft_model":
                draft = _draft_spec(self, speculative, dims, dtype, config, max_model_len)
        return EngineSpec(self.model, source, dims, dtype, self.device, self.comm, float(self.timeout_s),
                          max_model_len, self.progress, self.tokenizer_cache, {"metadata_s": metadata_s},
                          dims.describe_nodes(env.local_world_size if env else None), self.moe_dispatch,
                          self.quantization, self.quant_group, self.max_num_batched_tokens, self.chunked_prefill,
                          self.fault, self.kv_cache_memory, self.block_size, self.prefix_caching,
                          read_chat_template(self.chat_template), sampling_defaults(self.generation_config, source),
                          self.deterministic, speculative, draft)


def _draft_spec(args: EngineArgs, speculative, dims: ParallelDims, dtype: str, config, max_model_len: int) -> EngineSpec:
    """The draft model's spec: at ``draft_tensor_parallel_size`` (default: the target's tp) on the
    first ranks of each replica; refused unless it shares the target's vocabulary and context."""
    degree = speculative.draft_tensor_parallel_size or dims.tp
    if degree > dims.replica_size:
        raise TensorparError(f"draft_tensor_parallel_size {degree}: the draft runs on the first ranks of the target's "
                             f"{dims.replica_size}; give at most {dims.replica_size}")
    source = open_source(speculative.model)
    source.verify()
    draft = source.config
    if draft.vocab_size != config.vocab_size:
        raise TensorparError(f"the draft model {speculative.model} has a vocabulary of {draft.vocab_size} tokens, the "
                             f"target {args.model} {config.vocab_size}: a draft must share the target's vocabulary")
    if draft.max_position_embeddings < max_model_len:
        raise TensorparError(f"the draft model {speculative.model} has a context of {draft.max_position_embeddings} "
                             f"tokens, less than --max-model-len {max_model_len}: give a shorter one")
    draft_dims = ParallelDims.resolve(draft.num_heads, degree, supported=("tp",), num_layers=draft.num_layers)
    return EngineSpec(speculative.model, source, draft_dims, dtype, args.device, args.comm, float(args.timeout_s),
                      max_model_len, False, args.tokenizer_cache, layout=draft_dims.describe(),
                      block_size=args.block_size, prefix_caching=False, deterministic=args.deterministic)


def _check_deterministic(args: EngineArgs, dtype: str, config) -> None:
    """Refuse, before any rank starts, what deterministic mode does not cover yet."""
    why = []
    if args.device != "cpu":
        why.append(f"--device {args.device} (CPU only)")
    if torch_name(dtype) != "float32":
        why.append(f"--dtype {args.dtype if args.dtype != 'auto' else torch_name(dtype)} (float32 only)")
    if args.quantization != "none":
        why.append(f"--quantization {args.quantization} (float weights only)")
    if config.num_experts and (config.mlp_bias or not config.gated_mlp):
        why.append("a mixture of experts whose experts have biases or no gate")
    if why:
        raise TensorparError("--deterministic does not cover " + ", ".join(why) + " yet")


def one_rank_fewer(args: EngineArgs, dims: ParallelDims) -> EngineArgs | None:
    """The layout left when a rank of ``dims`` is lost (elastic serving, ``LLM(elastic=True)``):
    tp - 1, else at tp 1 one pipeline stage fewer; None at one rank."""
    if dims.tp > 1:
        return replace(args, tp=dims.tp - 1, pp=dims.pp, speculative_config=_draft_within(args, dims.tp - 1))
    if dims.pp > 1:
        return replace(args, tp=1, pp=dims.pp - 1)
    return None


def _draft_within(args: EngineArgs, ranks: int):
    """``args.speculative_config`` with its draft's degree at most ``ranks`` (what is left)."""
    from tensorpar.runtime.speculative import SpeculativeConfig

    config = SpeculativeConfig.parse(args.speculative_config)
    if config is None or (config.draft_tensor_parallel_size or 0) <= ranks:
        return args.speculative_config
    return replace(config, draft_tensor_parallel_size=ranks)


def read_chat_template(given: str | None) -> str | None:
    """``--chat-template``: a file's text, or the template itself (it has Jinja tags)."""
    if given is None:
        return None
    path = Path(given).expanduser()
    if "{{" not in given and "{%" not in given:
        if not path.is_file():
            raise TensorparError(f"--chat-template {given}: no such file (give a Jinja template file, or the "
                                 "template text)")
        return path.read_text()
    return given


def sampling_defaults(generation_config: str, source) -> dict:
    """The ``SamplingParams`` defaults ``--generation-config`` names (``EngineArgs``)."""
    from tensorpar.loading.sources import generation_defaults, read_json

    if generation_config == "auto":
        return dict(source.sampling_defaults)
    if generation_config == "vllm":
        return {}
    path = Path(generation_config).expanduser()
    path = path / "generation_config.json" if path.is_dir() else path
    if not path.is_file():
        raise TensorparError(f"--generation-config {generation_config}: no such file; give auto, vllm, or a folder "
                             "holding a generation_config.json")
    try:
        return generation_defaults(read_json(path))
    except (OSError, ValueError, TensorparError) as e:
        raise TensorparError(f"--generation-config {generation_config}: cannot read {path} ({e}); give auto, vllm, "
                             "or a folder holding a generation_config.json") from None
