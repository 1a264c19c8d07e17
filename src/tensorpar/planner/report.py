"""The plan as a readable table (default) or as JSON (``--json``)."""

from __future__ import annotations

import json

from tensorpar.planner.hardware import GIB


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return " | ".join(out).rstrip()

    return [line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)]


def describe(result) -> list[str]:
    r, arch, dev = result.request, result.arch, result.device
    kind = f"{arch.experts} experts, {arch.experts_per_token} per token, " if arch.moe else ""
    lines = [
        f"tensorpar plan: {arch.name} ({arch.total_params() / 1e9:.1f}B parameters, {kind}{arch.layers} layers, "
        f"{arch.heads} query / {arch.kv_heads} KV heads), {r.dtype} weights"
        + (f", {result.precision.kv_dtype} KV cache" if r.mode == "inference" else ""),
        f"hardware: {r.gpus} x {dev.name} in {result.nodes} node(s) of {result.gpus_per_node} - {dev.description}"
        + (f" [{dev.source}]" if dev.source != "built-in catalog" else ""),
    ]
    if r.mode == "inference":
        slo = []
        if r.slo_ttft_ms is not None:
            slo.append(f"TTFT <= {r.slo_ttft_ms:g} ms")
        if r.slo_tpot_ms is not None:
            slo.append(f"TPOT <= {r.slo_tpot_ms:g} ms")
        lines.append(f"workload: {r.batch} concurrent sequence(s) per replica, prompt {r.prompt_len} + output "
                     f"{r.output_len} tokens" + (f"; SLO {', '.join(slo)}" if slo else ""))
        if result.engine is not None:
            lines.append(f"engine: {result.engine.name} - {result.engine.description}")
    else:
        lines.append(f"workload: training, global batch {r.global_batch} x {r.seq_len} tokens, micro-batch "
                     f"{r.micro_batch}, sequence parallel {'on' if r.sequence_parallel else 'off'}, "
                     f"recompute {r.recompute}" + (", distributed optimizer" if r.distributed_optimizer else "")
                     + (f", interleaved 1F1B with {r.virtual_stages} virtual stages" if r.virtual_stages > 1 else ""))
    lines.extend(f"note: {n}" for n in result.notes)
    return lines


def render_table(result) -> str:
    inference = result.request.mode == "inference"
    if inference:
        header = ["", "config", "weights", "KV", "activ.", "total/capacity GiB", "KV capacity tok", "TTFT ms",
                  "TPOT ms", "tok/s", "$/Mtok", "notes"]
    else:
        header = ["", "config", "weights+grads", "optimizer", "activ.", "total/capacity GiB", "step s", "tok/s",
                  "MFU", "bubble", "$/Mtok", "notes"]
    rows = []
    for c in result.configs:
        mark = "*" if c is result.recommended else ""
        m = c.memory
        mem = ["-", "-", "-", "-"]
        if m is not None:
            second = m.kv_cache if inference else m.optimizer
            mem = [f"{m.weights / GIB:.1f}", f"{second / GIB:.2f}" if inference else f"{second / GIB:.1f}",
                   f"{m.activations / GIB:.2f}", f"{m.total / GIB:.1f} / {m.capacity / GIB:.1f}"]
        if not c.feasible and m is not None and not m.fits:
            note = f"does not fit: needs {m.total / GIB:.1f} GiB, has {m.capacity / GIB:.1f}"
        elif not c.feasible:
            note = c.reason
        else:
            note = "; ".join(x for x in (c.slo_miss, c.note) if x)
        if inference:
            row = [mark, c.label, *mem, _fmt(m.kv_capacity_tokens if m and c.feasible else None, ",d"),
                   _fmt(c.ttft_ms, ".1f"), _fmt(c.tpot_ms, ".2f"), _fmt(c.throughput_tok_s, ",.0f"),
                   _fmt(c.usd_per_mtok, ".2f"), note or ""]
        else:
            t = c.training
            row = [mark, c.label, *mem, _fmt(t.step if t else None, ".2f"), _fmt(c.throughput_tok_s, ",.0f"),
                   _fmt(100 * c.mfu if c.mfu is not None else None, ".0f") + ("%" if c.mfu is not None else ""),
                   _fmt(100 * t.bubble if t else None, ".0f") + ("%" if t else ""), _fmt(c.usd_per_mtok, ".2f"),
                   note or ""]
        rows.append(row)
    right = set(range(2, len(header) - 1))
    lines = describe(result) + [""] + _table(header, rows, right)
    lines.append("")
    lines.append("* recommended. Memory is per GPU on the busiest rank (runtime reserve included in total); "
                 + ("TPOT at the mean context; tok/s = output tokens per second over all GPUs; $/Mtok per "
                    "million output tokens." if inference else "tok/s = training tokens per second over all GPUs."))
    if result.calibration is not None:
        lines.append("")
        lines.extend(render_calibration(result.calibration))
    lines.append("")
    lines.append(wrap(result.explanation))
    if result.degrades_to:
        lines.append("")
        lines.append(wrap(render_degradation(result)))
    return "\n".join(lines)


def render_degradation(result) -> str:
    """One sentence: what the recommendation becomes as ranks are lost (``planner.degradation``)."""
    unit = "CPU ranks" if result.device.is_cpu else "GPUs"
    inference = result.request.mode == "inference"
    parts = []
    for step in result.degrades_to:
        if step["layout"] is None:
            parts.append(f"at {step['gpus']} nothing fits ({step['reason'].split(':')[0]})")
        elif inference and step.get("tpot_x") is not None:
            parts.append(f"at {step['gpus']}, {step['layout']}: {step['tpot_ms']:.2f} ms per token "
                         f"({step['tpot_x']:.2f}x), {step['throughput_tok_s']:,.0f} tok/s")
        else:
            x = f" ({step['throughput_x']:.2f}x)" if step.get("throughput_x") is not None else ""
            parts.append(f"at {step['gpus']}, {step['layout']}: {step['throughput_tok_s']:,.0f} tok/s{x}")
    return (f"If {unit} are lost, the best layout of those left: " + "; ".join(parts) + ".")


def render_calibration(report) -> list[str]:
    p = report.params
    lines = [f"calibrated from {report.source} ({report.model}, {report.dtype}, collectives over {report.backend}): "
             f"memory efficiency {p['memory_efficiency']:.2f}, matmul efficiency {p['matmul_efficiency']:.2f}, "
             f"matmul n1/2 {p['gemm_half_rows']:.1f} rows, layer overhead {p['layer_overhead_us']:.0f} us"]
    rows = [[r.kind, str(r.tp), str(r.batch) if r.kind == "decode" else f"{r.prompt} tok",
             f"{r.measured_ms:.1f}", f"{r.predicted_ms:.1f}", f"{100 * r.error:+.0f}%"] for r in report.rows]
    lines += _table(["phase", "TP", "batch", "measured ms", "predicted ms", "error"], rows, {1, 2, 3, 4, 5})
    return lines


def wrap(text: str, width: int = 100) -> str:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return "\n".join(out)


def render_json(result) -> str:
    return json.dumps(result.to_json(), indent=2)
