"""Plain-text tables of a benchmark result (the same dictionary that goes to ``bench.json``)."""

from __future__ import annotations


def table(headers: list[str], rows: list[list], title: str | None = None, left_last: bool = False) -> str:
    """Columns right-aligned (the last one left-aligned if ``left_last``); ``None`` shows as ``-``."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        last = len(values) - 1
        return " | ".join(v.ljust(w) if i == last and left_last else v.rjust(w)
                          for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    out = [title] if title else []
    out += [line(headers), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _f(x, digits=1):
    return None if x is None else f"{x:.{digits}f}"


def _rss(values):
    return ", ".join(f"{m:.0f}" for m in values) if values else None


def tensorpar_table(result: dict) -> str:
    s = result["settings"]
    batches = [str(b) for b in s["batch"]]
    pct = {r["tp"]: r["percent_of_roofline"] for r in (result.get("roofline") or {}).get("per_tp", [])}
    headers = ["TP", "backend", *[f"decode ms/tok b={b}" for b in batches], *[f"tok/s b={b}" for b in batches if b != "1"],
               f"prefill tok/s ({s['prompt_len']})", "peak RSS MiB per rank", "% roofline b=1", "load s"]
    rows = []
    for r in result["tensorpar"]:
        tp = r["tp"] if r.get("pp", 1) == 1 else f"{r['tp']} x pp {r['pp']}"
        if r.get("dp", 1) > 1:
            tp = f"{tp} x dp {r['dp']}"
        if r.get("ep", 1) > 1:
            tp = f"{tp}, ep {r['ep']}"
        if r.get("moe_dispatch", "auto") != "auto":
            tp = f"{tp}, {r['moe_dispatch']}"
        if "quantization" in r:
            tp = f"{tp}, {r['quantization']}"
        if r.get("deterministic"):
            tp = f"{tp}, deterministic"
        if r.get("speculative"):
            rates = ", ".join(f"b={b} {v['acceptance_rate']:.0%}" for b, v in r.get("speculation", {}).items())
            tp = f"{tp}, {r['speculative']}" + (f" (accepted {rates})" if rates else "")
        if r.get("status") != "ok":
            rows.append([tp, "FAILED: " + r.get("reason", "?")] + [None] * (len(headers) - 2))
            continue
        rows.append([
            tp, r.get("backend"),
            *[_f(r["decode_ms_per_token"].get(b), 2) for b in batches],
            *[_f(r["decode_tokens_per_s"].get(b), 0) for b in batches if b != "1"],
            _f(r["prefill_tokens_per_s"], 0), _rss(r["peak_rss_mb"]),
            _f(pct.get(r["tp"]) if "quantization" not in r else None, 0), _f(r.get("load_s"), 1),
        ])
    return table(headers, rows, f"tensorpar: {s['model']}, {s['new_tokens']} new tokens, prompts of 16 tokens "
                                f"(decode) / {s['prompt_len']} tokens (prefill), float32, best of {s.get('repeats', 1)}")


def experts_table(result: dict) -> str:
    """Per MoE layer and phase of each layout: tokens routed, the busiest expert's share of them
    (1 / experts would be even) and the imbalance of the expert sets (the busiest set's load over
    the mean)."""
    rows = []
    for r in result["tensorpar"]:
        for phase, load in (r.get("experts") or {}).items():
            for layer, counts in load["tokens"].items():
                total = sum(counts)
                label = f"tp {r['tp']}, ep {r.get('ep', 1)}" + (f", {r['moe_dispatch']}" if "moe_dispatch" in r else "")
                rows.append([label, phase, layer, total, _f(max(counts) / total if total else None, 3),
                             _f(1 / len(counts), 3), _f(load["imbalance"][layer], 2)])
    if not rows:
        return ""
    return table(["layout", "phase", "layer", "tokens routed (x top-k)", "busiest expert's share", "even share",
                  "expert-set imbalance"], rows, "expert load (histograms: experts.png)")


def peers_table(result: dict) -> str:
    peers = result.get("peers")
    if not peers:
        return "peers: skipped (--no-peers)"
    batches = [str(b) for b in result["settings"]["batch"]]
    headers = ["peer", "TP", "threads", *[f"decode ms/tok b={b}" for b in batches], "prefill tok/s",
               "peak RSS MiB per rank", "result"]
    rows = []
    for p in [peers.get("transformers"), *peers.get("transformers_tp_plan", [])]:
        if not p:
            continue
        if p.get("status") == "ok":
            rows.append([p["peer"], p["tp"], p.get("threads"),
                         *[_f(p["decode_ms_per_token"].get(b), 2) for b in batches],
                         _f(p["prefill_tokens_per_s"], 0), _rss(p["peak_rss_mb"]), "ok"])
        else:
            rows.append([p["peer"], p["tp"], None, *[None] * len(batches), None, None, "FAILED: " + p["reason"]])
    return table(headers, rows, left_last=True, title="peers (fresh processes, same checkpoint and prompts, float32; decode = "
                                "generate(N) - generate(1) over N-1 steps)")


def llama_cpp_table(result: dict) -> str:
    """llama.cpp's rows (the 2025 build through llama-cpp-python, then the current build's
    llama-bench), and beside each tensorpar's batch-1 decode at every TP degree for the matching
    --quantization, as a ratio to llama.cpp's time (below 1: tensorpar is faster)."""
    peers = result.get("peers") or {}
    rows_in = [*(peers.get("llama_cpp") or []), *(peers.get("llama_cpp_current") or [])]
    if not rows_in:
        return ""
    ours = {}
    for r in result["tensorpar"]:
        if r.get("status") == "ok" and r.get("pp", 1) == 1 and r.get("dp", 1) == 1:
            ours[(r.get("quantization", "none").split()[0], r["tp"])] = r["decode_ms_per_token"].get("1")  # ("int4 g32")
    from tensorpar.bench.peers import LLAMA_TYPES

    by_type = {t: q for q, t in LLAMA_TYPES.items()}
    tps = sorted({tp for _, tp in ours})
    headers = ["peer", "llama.cpp type", "threads", "decode ms/tok b=1", "prefill tok/s", "--quantization",
               *[f"tensorpar TP={tp} ms (x llama.cpp)" for tp in tps], "result"]
    rows = []
    for r in rows_in:
        kind = r.get("type")
        if kind == "native" and r.get("file_type"):
            kind = f"native ({r['file_type']})"
        if r.get("status") != "ok":
            rows.append([r.get("peer"), kind, r.get("threads"), None, None, None, *[None] * len(tps),
                         f"{r['status'].upper()}: {r.get('reason')}"])
            continue
        ms = r["decode_ms_per_token"]["1"]
        quant = by_type.get(r["type"])
        if r["type"] == "native" and r.get("file_type") == "F32":
            quant = "none"  # a float32 file: its own blocks are float32
        side = []
        for tp in tps:
            t = ours.get((quant, tp))
            side.append(None if t is None else f"{t:.2f} ({t / ms:.2f}x)")
        rows.append([r.get("peer"), kind, r["threads"], _f(ms, 2), _f(r["prefill_tokens_per_s"], 0), quant, *side,
                     "ok"])
    return table(headers, rows, left_last=True, title="llama.cpp on the same GGUF file (fresh processes; native: the "
                                                      "file's own blocks, others written by llama.cpp; best of the "
                                                      "repeats)")


def roofline_table(result: dict) -> str:
    roof = result.get("roofline")
    if not roof or roof.get("status") == "failed":
        return f"roofline: not measured{': ' + roof['reason'] if roof else ''}"
    bw, bw_all = roof["bandwidth_1_thread"], roof.get("bandwidth_all_cores") or {}
    head = (f"roofline: {roof['weight_bytes'] / 1e6:.1f} MB of float32 weights per decoded token; "
            f"1 thread read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s"
            + (f"; {bw_all['threads']} threads read {bw_all['read_GBps']:.1f} GB/s, copy {bw_all['copy_GBps']:.1f} GB/s"
               if bw_all else "")
            + f"\n  -> {roof['roofline_ms_1core']:.1f} ms/token at 1 core (weights / 1-thread read bandwidth)")
    rows = [[r["tp"], r["cores_used"], _f(r["roofline_ms"], 2), _f(r["measured_ms"], 2), _f(r["percent_of_roofline"], 0)]
            for r in roof["per_tp"]]
    return table(["TP", "cores", "roofline ms/tok", "measured ms/tok b=1", "% of roofline"], rows, head)


def collectives_tables(result: dict) -> str:
    rows = result.get("collectives")
    if rows is None:
        return "collectives: skipped (--no-sweep)"
    out = []
    for f in result.get("collective_failures", []):
        out.append(f"collectives at {f['world_size']} ranks FAILED: {f['reason']}")
    order = ["all_reduce", "all_gather"]
    groups = sorted({(r["world_size"], r["collective"]) for r in rows},
                    key=lambda g: (g[0], order.index(g[1]) if g[1] in order else len(order), g[1]))
    for n, coll in groups:
        sel = [r for r in rows if (r["world_size"], r["collective"]) == (n, coll)]
        backends = sorted({r["backend"] for r in sel}, key=lambda b: (b != "gloo", b))
        by = {(r["backend"], r["bytes"]): r for r in sel}
        headers = ["bytes"]
        for b in backends:
            headers += [f"{b} us", f"{b} algbw GB/s", f"{b} busbw GB/s"]
        body = []
        for nbytes in sorted({r["bytes"] for r in sel}):
            line = [nbytes]
            for b in backends:
                r = by.get((b, nbytes))
                bad = "" if r is None or r["correct"] else " WRONG"
                line += [None if r is None else _f(r["latency_us"], 1) + bad,
                         None if r is None else f"{r['algbw_GBps']:.3g}",
                         None if r is None else f"{r['busbw_GBps']:.3g}"]
            body.append(line)
        op = ", ".join(sorted({f"{r['backend']}: {r['op']}" for r in sel}))
        out.append(table(headers, body, f"{coll.replace('_', '-')}, {n} ranks ({op}); median latency of the slowest rank"))
    if "shm" not in {r["backend"] for r in rows}:
        out.append("(no shared-memory communicator in these ranks: shm not measured)")
    return "\n\n".join(out)


def render(result: dict) -> str:
    parts = [tensorpar_table(result), experts_table(result), peers_table(result), llama_cpp_table(result),
             roofline_table(result),
             collectives_tables(result)]
    return "\n\n".join(p for p in parts if p)
