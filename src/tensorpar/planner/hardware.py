"""Devices the planner can place ranks on: a built-in catalog and JSON device files.

Numbers are datasheet peaks (dense, no sparsity) plus achievable-efficiency factors:

- ``matmul_efficiency``: the fraction of the 16-bit (or 32-bit) peak FLOP/s a large matmul
  reaches. One H100 measured with PyTorch gave 798 of 989 TFLOP/s on an 8192^3 bf16 matmul
  (0.81); real layer shapes do less, so GPUs use 0.75. Smaller shapes lose more by tile and wave
  quantization on the ``sm_count`` multiprocessors (``gemm``).
- ``low_precision_efficiency``: the fraction of the datasheet 8-bit (fp8 / int8) peak a matmul
  reaches end to end, activations quantized and scaled. The datasheet doubles the 16-bit rate;
  achieved FP8 does not: 0.654 of 1979 TFLOP/s is 1.74x the 0.75 x 989 of bf16. The value
  (``LOW_PRECISION_EFFICIENCY``, every GPU but the MI300X) is the one fitted on the fitting set of
  ``docs/planner-validation.md`` (FP8 prefill and large-batch rows of TensorRT-LLM on
  H100/H200/L40S), where the datasheet ratio made every FP8 row too fast. A measurement it was
  not fitted on agrees: Azure's AI-benchmarking-guide (``Azure_Results/ND_H100_v5_results.md``)
  measures an 8192^3 FP8 cuBLASLt matmul on an H100 at 1290.1 TFLOP/s, 0.652 of the peak.
- The **MI300X**'s rates are measured, not fitted (no fitting row runs on one). The same guide
  (``ND_MI300X_v5_results.md``, hipBLASLt) measures its 8192^3 FP8 matmul at 1222.9 of 2614.9
  TFLOP/s: 0.468, which is ``low_precision_efficiency`` = 0.654 x 0.468 / 0.652 = 0.47. AMD's
  "Measuring Max-Achievable FLOPs, part 2" (ROCm blog, 2025) measures 708 of 1307 bf16 TFLOP/s
  at its best shape (0.54); scaled as the H100's 0.81 became 0.75: ``matmul_efficiency`` 0.50.
  BabelStream triad reaches 4.10 of 5.3 TB/s (0.77) where the H100 reaches 2.97 of 3.35 (0.89):
  ``memory_efficiency`` 0.85 x 0.77 / 0.89 = 0.74.
- ``attention_efficiency``: the fraction of the 16-bit peak the attention core reaches; it runs
  in 16-bit whatever the weights (engines keep Q K^T and P V in bf16/fp16 even with FP8
  weights). FlashAttention-2 reports 50-73% of the A100's peak in the forward pass (0.65 here);
  on H100 FlashAttention-2 reaches about 35% and FlashAttention-3 up to 75% (0.5 here).
- ``memory_efficiency``: the fraction of peak memory bandwidth that streaming weights reaches
  (0.85; an H100 device-to-device copy measured about 3.0 of 3.35 TB/s).
- ``gemm_half_rows``: Hockney's n_1/2 for matmuls: a product with M rows (tokens) reaches
  ``M / (M + n_1/2)`` of the large-matmul rate.
- ``layer_overhead_us``: fixed time per decoder layer per forward step that no roofline sees
  (kernel launches, framework bookkeeping).
- ``intra_node`` / ``inter_node``: links for collectives (see ``comm``), one fit per device
  family, each over every >= 1 MiB row of a published NCCL all-reduce profile in
  ``shared/calibration`` (``alpha(n) = alpha0 + (n - 1) alpha_rank``: latency grows with the
  ranks as measured):

  ========================  ===================================  =====================================
  family                    alpha(n)                              bus bandwidth
  ========================  ===================================  =====================================
  NVLink 4 (H100, H200)     24.1 us + 0.86 us (n - 1) (DGX-H100)  0.765 x 450 GB/s (DGX-H100 fit);
                                                                   NVLS 0.6 x 450 GB/s per byte once
                                                                   (480 GB/s busbw at 8 H100s, nccl
                                                                   issue 1455; 475 on H200, nccl-tests
                                                                   issue 272)
  NVLink 3 (A100)           39.9 us + 2.14 us (n - 1) (DGX-A100)  0.72 x 300 GB/s (200-233 GB/s in
                                                                   nccl-tests issues 149, 175)
  Infinity Fabric (MI300X)  40 us + 2 us (n - 1)                 0.7 x 448 GB/s (7 links of 64 GB/s
                                                                   per direction); both checked on AMD's
                                                                   RCCL acceptance table (below)
  ========================  ===================================  =====================================

  ``docs/planner-validation.md`` checks them against measurements they were not fitted on. The
  MI300X's constants were chosen before any RCCL profile was found; AMD's MI300X acceptance
  guide (``docs/mi300x/performance-bench.rst`` of ROCm/system-acceptance-docs, rccl-tests
  ``all_reduce_perf -g 8``) measures 31 GB/s bus bandwidth at 1 MiB, 132 at 8 MiB, 274 at
  64 MiB and 313 at 1 GiB; these constants give times within 15% of every row from 1 MiB to
  8 GiB (median 2%), so they stay.
- ``price_per_hour``: on-demand list price of one GPU-hour (USD, 2024-2025 clouds; the MI300X's
  is an estimate); override it with a JSON device file.
- ``sm_count``: streaming multiprocessors (compute units on the MI300X), for the tile and wave
  model of ``gemm``; none on CPUs.

The ``cpu`` device is this kind of machine (the 2-core development host of PERF_NOTES.md):
each rank is a process with at least one core; ``tensorpar bench`` results passed to
``--calibrate`` replace its defaults with measured values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from tensorpar.planner.jsonfile import read_json_object

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}  # by short name (tensorpar.dtypes)
DTYPES = tuple(DTYPE_BYTES)

# Ring all-reduce over NVLink 4, fitted on vidur_h100_dgx_all_reduce.csv (see module docstring).
NVLINK_LATENCY_US = 24.1
NVLINK_LATENCY_PER_RANK_US = 0.86
RING_EFFICIENCY = 0.765
SHARP_EFFICIENCY = 0.6
# NVLink 3 (A100): latency fitted on vidur_a100_dgx_all_reduce.csv (one node), bus bandwidth from
# nccl-tests (216.5 of 300 GB/s, the middle of 200-233).
NVLINK3_LATENCY_US = 39.9
NVLINK3_LATENCY_PER_RANK_US = 2.14
NVLINK3_RING_EFFICIENCY = 0.72
# Achieved FP8/INT8 matmul rate over the datasheet's, fitted (module docstring).
LOW_PRECISION_EFFICIENCY = 0.654
GIB = float(1 << 30)


@dataclass(frozen=True)
class Link:
    """A collective's path: ``bandwidth_GBps`` is per GPU and direction for links inside a node,
    and the node's total for the link between nodes. ``latency_us`` + ``(n - 1) *
    latency_per_rank_us`` is the fixed cost of one collective over n ranks; ``efficiency`` is the
    fraction of bandwidth a ring reaches as bus bandwidth; ``sharp``: the switch reduces in place
    (NVLink SHARP), each byte crossing the link once at ``sharp_efficiency`` of bandwidth."""

    bandwidth_GBps: float
    latency_us: float
    latency_per_rank_us: float = 0.0
    efficiency: float = RING_EFFICIENCY
    sharp: bool = False
    sharp_efficiency: float = SHARP_EFFICIENCY


@dataclass(frozen=True)
class MeasuredCollective:
    """A fitted ``time = alpha + bytes * factor / busbw`` for one op at one world size (from
    ``tensorpar bench``); it replaces the link model for that op and size."""

    op: str
    world_size: int
    alpha_us: float
    busbw_GBps: float


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    peak_tflops: dict
    memory_gib: float
    memory_bandwidth_GBps: float
    intra_node: Link
    inter_node: Link | None
    gpus_per_node: int
    price_per_hour: float
    matmul_efficiency: float = 0.75
    low_precision_efficiency: float = LOW_PRECISION_EFFICIENCY
    attention_efficiency: float = 0.5
    sm_count: int | None = None
    memory_efficiency: float = 0.85
    gemm_half_rows: float = 32.0
    layer_overhead_us: float = 30.0
    runtime_reserve_gib: float = 1.0
    # CPU ranks: ``cores`` per host, shared by the ranks placed there; ``node_memory_bandwidth``
    # caps all cores together; kernels with fewer than ``parallel_min_rows`` rows run on one
    # thread; ``memory_shared``: the ranks of a host share its memory; a collective whose ranks
    # outnumber the cores waits ``oversubscribed_latency_us`` more for a descheduled rank.
    cores: int | None = None
    node_memory_bandwidth_GBps: float | None = None
    parallel_min_rows: int = 0
    memory_shared: bool = False
    oversubscribed_latency_us: float = 0.0
    measured_collectives: tuple = ()
    source: str = "built-in catalog"

    @property
    def is_cpu(self) -> bool:
        return self.cores is not None

    def compute_dtype(self, weight_dtype: str) -> str:
        """The dtype matmuls run in: the weights' own when the device has a rate for it, else
        16-bit (weight-only quantization: 8-bit weights are widened before the matmul)."""
        if weight_dtype in self.peak_tflops:
            return weight_dtype
        for alt in ("bf16", "fp16", "fp32"):
            if alt in self.peak_tflops:
                return alt
        raise ValueError(f"device {self.name!r} lists no peak FLOP/s")

    def peak_flops(self, weight_dtype: str) -> float:
        return self.peak_tflops[self.compute_dtype(weight_dtype)] * 1e12

    def matmul_flops(self, weight_dtype: str) -> float:
        """Achievable FLOP/s of a large matmul in the compute dtype: the datasheet peak times
        ``matmul_efficiency`` (16/32-bit) or ``low_precision_efficiency`` (8-bit)."""
        dtype = self.compute_dtype(weight_dtype)
        eff = self.low_precision_efficiency if dtype in ("fp8", "int8") else self.matmul_efficiency
        return self.peak_tflops[dtype] * 1e12 * eff

    def attention_flops(self) -> float:
        """Achievable FLOP/s of the attention core, always in 16 (or 32) bits."""
        dtype = self.compute_dtype("bf16")
        return self.peak_tflops[dtype] * 1e12 * self.attention_efficiency


def _nvlink(bandwidth: float, sharp: bool = False) -> Link:
    """NVLink 4 + NVSwitch (H100, H200)."""
    return Link(bandwidth, NVLINK_LATENCY_US, NVLINK_LATENCY_PER_RANK_US, RING_EFFICIENCY, sharp)


def _nvlink3(bandwidth: float) -> Link:
    """NVLink 3 + NVSwitch (A100)."""
    return Link(bandwidth, NVLINK3_LATENCY_US, NVLINK3_LATENCY_PER_RANK_US, NVLINK3_RING_EFFICIENCY)


def _pcie(bandwidth: float, latency_us: float = 30.0) -> Link:
    return Link(bandwidth, latency_us, 2.0, 0.8)


H100_PEAKS = {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "int8": 1979.0}

BUILTIN_DEVICES: dict[str, Device] = {
    "h100-sxm": Device(
        "h100-sxm", "NVIDIA H100 SXM 80GB (HBM3 3.35 TB/s, NVLink 4 + NVSwitch, 8 per node, 8x400G InfiniBand)",
        H100_PEAKS, 79.6, 3350.0, _nvlink(450.0, sharp=True), Link(400.0, 45.0, 0.5, 0.9), 8, 2.99, sm_count=132),
    "h200-sxm": Device(
        "h200-sxm", "NVIDIA H200 SXM 141GB (HBM3e 4.8 TB/s, NVLink 4 + NVSwitch, 8 per node, 8x400G InfiniBand)",
        H100_PEAKS, 140.4, 4800.0, _nvlink(450.0, sharp=True), Link(400.0, 45.0, 0.5, 0.9), 8, 3.79, sm_count=132),
    "a100-80gb-sxm": Device(
        "a100-80gb-sxm", "NVIDIA A100 SXM 80GB (HBM2e 2.04 TB/s, NVLink 3 + NVSwitch, 8 per node, 8x200G InfiniBand)",
        {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0, "int8": 624.0}, 80.0, 2039.0, _nvlink3(300.0),
        Link(200.0, 45.0, 0.5, 0.9), 8, 1.79, attention_efficiency=0.65, sm_count=108),
    "a100-40gb-sxm": Device(
        "a100-40gb-sxm", "NVIDIA A100 SXM 40GB (HBM2 1.56 TB/s, NVLink 3 + NVSwitch, 8 per node, 8x200G InfiniBand)",
        {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0, "int8": 624.0}, 40.0, 1555.0, _nvlink3(300.0),
        Link(200.0, 45.0, 0.5, 0.9), 8, 1.29, attention_efficiency=0.65, sm_count=108),
    "h100-pcie": Device(
        "h100-pcie", "NVIDIA H100 PCIe 80GB (HBM2e 2.0 TB/s, PCIe Gen5 x16 between GPUs, 8 per node)",
        {"fp32": 51.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "int8": 1513.0}, 79.6, 2000.0,
        _pcie(64.0), Link(50.0, 45.0, 0.5, 0.9), 8, 2.49, sm_count=114),
    "l40s": Device(
        "l40s", "NVIDIA L40S 48GB (GDDR6 864 GB/s, PCIe Gen4 x16 only, 8 per node)",
        {"fp32": 91.6, "bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "int8": 733.0}, 44.99, 864.0,
        _pcie(32.0), Link(50.0, 45.0, 0.5, 0.9), 8, 1.09, sm_count=142),
    "rtx-4090": Device(
        "rtx-4090", "NVIDIA GeForce RTX 4090 24GB (GDDR6X 1.0 TB/s, PCIe Gen4 x16, no peer-to-peer, 8 per node)",
        {"fp32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3, "int8": 660.6}, 23.99, 1008.0,
        _pcie(32.0, latency_us=40.0), Link(12.5, 60.0, 0.5, 0.9), 8, 0.69, sm_count=128),
    "mi300x": Device(
        "mi300x", "AMD Instinct MI300X 192GB (HBM3 5.3 TB/s, Infinity Fabric to 7 peers, 8 per node, 8x400G)",
        {"fp32": 163.4, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9, "int8": 2614.9}, 191.5, 5300.0,
        Link(448.0, 40.0, 2.0, 0.7), Link(400.0, 45.0, 0.5, 0.9), 8, 3.49, sm_count=304,
        matmul_efficiency=0.50, low_precision_efficiency=0.47, memory_efficiency=0.74),
    # This kind of machine (PERF_NOTES.md, BENCHMARKS.md): 2 AVX-512 cores (peaks per core),
    # about 28 GB/s read per core and 43-53 GB/s for both; batch-1 matrix-vector products stream
    # about 18 GB/s (0.6 of read bandwidth) and run on one thread; prefill GEMMs reach about 70
    # GFLOP/s per core and batch-8 steps about half that (n_1/2 = 8 rows); about 35 small eager
    # operators per layer cost about 270 us; the shared-memory all-reduce takes about 4 us and
    # moves about 2 GB/s; a collective over more ranks than cores waits about 40 us more.
    "cpu": Device(
        "cpu", "this machine's CPU cores, one rank per core (defaults from PERF_NOTES.md; refine with --calibrate)",
        {"fp32": 0.1}, 22.0, 28.0, Link(2.1, 4.0, 0.0, 1.0), None, 256, 0.05,
        matmul_efficiency=0.7, attention_efficiency=0.7, memory_efficiency=0.6, gemm_half_rows=8.0,
        layer_overhead_us=270.0,
        runtime_reserve_gib=0.4, cores=2, node_memory_bandwidth_GBps=50.0, parallel_min_rows=64,
        memory_shared=True, oversubscribed_latency_us=40.0),
}

REQUIRED_KEYS = ("peak_tflops", "memory_gib", "memory_bandwidth_GBps", "intra_node", "gpus_per_node",
                 "price_per_hour")
LINK_KEYS = tuple(f.name for f in fields(Link))


def _link(value, where: str) -> Link:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object with bandwidth_GBps and latency_us")
    unknown = sorted(set(value) - set(LINK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; allowed: {', '.join(LINK_KEYS)}")
    for key in ("bandwidth_GBps", "latency_us"):
        if key not in value:
            raise ValueError(f"{where} needs {key}")
        if not isinstance(value[key], (int, float)) or value[key] < 0 or (key == "bandwidth_GBps" and value[key] == 0):
            raise ValueError(f"{where}.{key} must be a positive number, got {value[key]!r}")
    defaults = {"latency_per_rank_us": 0.0, "efficiency": RING_EFFICIENCY, "sharp": False,
                "sharp_efficiency": SHARP_EFFICIENCY}
    return Link(**{**defaults, **value})


def device_from_dict(d: dict, name: str) -> Device:
    """A device described in JSON (see README: ``tensorpar plan --gpu FILE.json``)."""
    allowed = {f.name for f in fields(Device)} - {"measured_collectives", "source"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"device file: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ValueError(f"device file lacks {', '.join(missing)} (required: {', '.join(REQUIRED_KEYS)})")
    peaks = d["peak_tflops"]
    if not isinstance(peaks, dict) or not peaks:
        raise ValueError('device file: peak_tflops must map dtypes to dense TFLOP/s, e.g. {"bf16": 989}')
    bad = sorted(set(peaks) - set(DTYPES))
    if bad:
        raise ValueError(f"device file: peak_tflops has unknown dtypes {', '.join(bad)}; allowed: {', '.join(DTYPES)}")
    for key in ("memory_gib", "memory_bandwidth_GBps", "gpus_per_node"):
        if not isinstance(d[key], (int, float)) or d[key] <= 0:
            raise ValueError(f"device file: {key} must be a positive number, got {d[key]!r}")
    if not isinstance(d["price_per_hour"], (int, float)) or d["price_per_hour"] < 0:
        raise ValueError(f"device file: price_per_hour must be a number >= 0, got {d['price_per_hour']!r}")
    kw = dict(d)
    kw["intra_node"] = _link(d["intra_node"], "intra_node")
    kw["inter_node"] = _link(d["inter_node"], "inter_node") if d.get("inter_node") else None
    kw["gpus_per_node"] = int(d["gpus_per_node"])
    kw.setdefault("description", name)
    kw["name"] = d.get("name", name)
    kw["peak_tflops"] = {k: float(v) for k, v in peaks.items()}
    return Device(**kw, source="device file")


def resolve_device(spec: str) -> Device:
    """A built-in device name or a JSON device file -> Device."""
    key = spec.strip().lower()
    if key in BUILTIN_DEVICES:
        return BUILTIN_DEVICES[key]
    path = Path(spec).expanduser()
    if path.is_file():
        d = read_json_object(path, "device file")
        return device_from_dict(d, path.stem)
    raise ValueError(
        f"unknown device {spec!r}: choose one of {', '.join(BUILTIN_DEVICES)}, or give a JSON device file "
        f"(peak_tflops, memory_gib, memory_bandwidth_GBps, intra_node, inter_node, gpus_per_node, price_per_hour)"
    )

