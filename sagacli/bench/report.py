"""The outputs of a run: ``bench.json`` (every figure), ``bench.md`` (tables, targets beside the
values), ``latency.png`` and ``throughput.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sagacli.bench.config import TARGETS, Target

JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"
LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"


def lookup(results: dict[str, Any], key: str) -> Any:
    node: Any = results
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def targets_for(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per MISSION.md target: the bound, the measured value, met or not, and why."""
    rows = []
    quick = bool(lookup(results, "bench.quick"))
    for target in TARGETS:
        value = lookup(results, target.key)
        part = target.key.split(".")[0]
        note = ""
        bound = target.bound
        met: bool | None
        if part == "recovery":
            session = lookup(results, "recovery.session_timeout_ms")
            bound = float(session + 1000) if session else math.nan
            target = Target(target.key, target.label, bound, False, "ms", f"session timeout {session} ms + 1 s")
            note = target.note
        met = target.met(value) if isinstance(value, int | float) and not math.isnan(bound) else None
        if part == "latency":
            level = lookup(results, "latency.at_500") or {}
            if level.get("skipped"):
                met, note = False, f"not run: {level['skipped']}"
            elif level and not level.get("sustained", False):
                met, note = False, "500 sagas/s was not sustained"
        if part == "throughput":
            runs = lookup(results, "throughput.runs") or []
            best = max(runs, key=lambda r: r.get("sagas_per_s", 0), default=None)
            if best:
                note = f"{best['replicas']} manager(s)" + ("" if best.get("saturated") else "; not saturated, capacity is higher")
        if part == "query":
            n = lookup(results, "query.sagas")
            if n is not None and n < 1_000_000:
                note = f"{n:,} sagas in the log (the target is for 1,000,000)"
        if part == "replay" and quick:
            note = f"{lookup(results, 'replay.records_replayed') or 0:,} records"
        if value is None and part in results.get("errors", {}):
            note = f"failed: {results['errors'][part]}"[:200]
        rows.append(
            {
                "key": target.key,
                "label": target.label,
                "target": target.text if not math.isnan(bound) else target.note,
                "bound": None if math.isnan(bound) else bound,
                "value": value,
                "unit": target.unit,
                "met": met,
                "note": note,
            }
        )
    return rows


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / JSON_NAME
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


# --- Markdown --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if isinstance(value, float) and math.isnan(value):
            return "—"
        return f"{value:,.{digits}f}"
    return str(value)


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    bench, env = results.get("bench", {}), results.get("environment", {})
    lines = [
        f"# saga bench results ({bench.get('date', '?')})",
        "",
        f"Command: `{bench.get('command', 'saga bench')}`{' (quick mode: smaller sizes, shorter runs)' if bench.get('quick') else ''}; "
        f"took {_fmt(bench.get('duration_s'))} s. Broker: {env.get('broker', '?')}. "
        f"{env.get('cpu_count', '?')} CPUs ({env.get('cpu_model', '?')}), load average before/after "
        f"{env.get('loadavg_start', '?')} / {env.get('loadavg_end', '?')}.",
        "",
        "## Targets (MISSION.md)",
        "",
    ]
    rows = []
    for t in results.get("targets", []):
        value = t["value"]
        shown = f"{_fmt(value, 1 if isinstance(value, float) and value < 100 else 0)} {t['unit']}" if value is not None else "—"
        rows.append([t["label"], t["target"], shown, _met(t["met"]), t["note"]])
    lines += _table(["Figure", "Target", "Measured", "Met?", "Note"], rows)
    met = [t for t in results.get("targets", []) if t["met"]]
    lines += [f"{len(met)} of {len(results.get('targets', []))} targets met.", ""]

    ceiling = results.get("ceiling")
    if ceiling:
        lines += [
            "## 1. Broker ceiling",
            "",
            f"Raw {ceiling['message_bytes']}-byte messages, {ceiling['messages']:,} of them, {ceiling['partitions']} partitions "
            f"({ceiling['producer']}): produce **{ceiling['produce_msgs_per_s']:,} msg/s** ({ceiling['produce_mb_per_s']} MB/s), "
            f"consume **{ceiling['consume_msgs_per_s']:,} msg/s** ({ceiling['consume_mb_per_s']} MB/s).",
            "",
        ]
    tput = results.get("throughput")
    if tput:
        lines += [
            "## 2. Throughput (saturation, open loop)",
            "",
            "Open-loop steps of rising offered load, from 0.8x a closed-loop probe, until one is not sustained; the figure is the "
            "highest completion rate of a step (its steady window). "
            f"Saga type `{tput['saga_type']}` ({tput['steps']} steps, no-op participants; {tput['messages_per_saga']} messages "
            "produced per saga). *Share of ceiling* = sagas/s x messages per saga / raw produce rate. CPU is per completed saga, "
            "all threads of each process.",
            "",
        ]
        rows = []
        for r in tput["runs"]:
            cpu = r.get("cpu_us_per_saga", {})
            lat = r.get("latency", {})
            rows.append(
                [
                    str(r["replicas"]),
                    _fmt(r["probe"]["sagas_per_s"]),
                    _fmt(r["offered_per_s"]),
                    f"**{_fmt(r['sagas_per_s'])}**",
                    _fmt(r["saturated"]),
                    f"{_fmt(lat.get('p50_ms'))} / {_fmt(lat.get('p99_ms'))}",
                    " / ".join(_fmt(cpu.get(k)) for k in ("managers", "participants", "broker", "bench", "total")),
                    _fmt(r.get("transactions_per_saga"), 3),
                    _fmt(r.get("broker_produce_share"), 3),
                    ", ".join(
                        f"{_fmt(st['offered_per_s'])} -> {_fmt(st['sagas_per_s'])}{'' if st['sustained'] else ' (not sustained)'}"
                        for st in r.get("steps", [])
                    ),
                ]
            )
        lines += _table(
            [
                "Managers", "Probe (closed loop)", "Offered/s", "Completed/s", "Saturated", "Latency p50 / p99 ms",
                "CPU µs/saga: managers / participants / broker / bench / total", "Txns/saga", "Share of ceiling",
                "Open-loop steps (offered -> completed/s)",
            ],
            rows,
        )
        lines += [f"![throughput]({THROUGHPUT_PNG})", ""]
    latency = results.get("latency")
    if latency:
        lines += ["## 3. Latency at fixed offered loads (1 manager)", ""]
        rows = []
        for lv in latency["levels"]:
            if lv.get("skipped"):
                rows.append([_fmt(lv["offered_per_s"]), "skipped", "", "", "", "", "", "", lv["skipped"]])
                continue
            rows.append(
                [
                    _fmt(lv["offered_per_s"]),
                    f"**{_fmt(lv['sustained'])}**",
                    _fmt(lv["achieved_per_s"]),
                    _fmt(lv.get("p50_ms"), 1),
                    _fmt(lv.get("p90_ms"), 1),
                    f"**{_fmt(lv.get('p99_ms'), 1)}**",
                    _fmt(lv.get("max_ms"), 1),
                    _fmt(lv.get("cpu_us_per_saga", {}).get("total")),
                    f"{lv['completed']:,} of {lv['sent']:,} ended; generator lag max {_fmt(lv['generator_max_lag_ms'])} ms",
                ]
            )
        lines += _table(["Offered/s", "Sustained", "Achieved/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "CPU µs/saga", "Note"], rows)
        hops = latency.get("hops_at_lowest_load")
        if hops:
            lines += [
                f"Where the time goes at {hops['offered_per_s']} sagas/s (medians over {hops['traced_sagas']} traced sagas; "
                "the three step hops repeat once per step):",
                "",
            ]
            lines += _table(
                ["Hop", "p50 ms"],
                [
                    ["start produced -> manager decides SagaBegun", _fmt(hops.get("start_to_begun_p50_ms"), 1)],
                    ["decision -> command produced (manager reaches that partition's transaction)", _fmt(hops.get("decision_to_command_p50_ms"), 1)],
                    ["command produced -> participant replied (commit, visibility, participant fetch)", _fmt(hops.get("command_to_reply_p50_ms"), 1)],
                    ["reply -> manager decides StepEnded (relay, inbox fetch, manager loop)", _fmt(hops.get("reply_to_decision_p50_ms"), 1)],
                ],
            )
        lines += [f"![latency]({LATENCY_PNG})", ""]
    replay = results.get("replay")
    if replay:
        split = replay.get("in_process_split", {})
        lines += [
            "## 4. Replay on takeover",
            "",
            f"A partition of {replay['records']:,} records ({replay['sagas']:,} sagas, {replay['unfinished_sagas']:,} unfinished; "
            f"{replay['record_bytes_mean']} bytes per record on average) taken over by an in-process `Manager._take_over`: "
            f"replay **{replay['records_per_s']:,} records/s** ({replay['replay_s']} s); assignment -> first resumed command "
            f"**{_fmt(replay['assignment_to_first_command_ms'])} ms**; {replay['resumed_sagas']:,} sagas resumed, "
            f"{replay['resumed_commands_seen']:,} commands re-sent. Share of the consume ceiling: {_fmt(replay.get('consume_ceiling_share'), 3)}. "
            f"In this process, decoding alone runs at {_fmt(split.get('decode_records_per_s'))} records/s "
            f"({split.get('decode_us_per_record')} µs each) and folding alone at {_fmt(split.get('fold_records_per_s'))} records/s "
            f"({split.get('fold_us_per_record')} µs each).",
            "",
        ]
    recovery = results.get("recovery")
    if recovery:
        lines += [
            "## 5. Recovery after kill -9 (3 managers under load)",
            "",
            f"{recovery['offered_per_s']} sagas/s offered; killed the owner of partitions {recovery['killed_partitions']}; "
            f"session timeout {recovery['session_timeout_ms']} ms. New claims after **{_fmt(recovery['claim_after_kill_ms'])} ms**, "
            f"sagas progress again after **{_fmt(recovery['progress_after_kill_ms'])} ms** (target {recovery['target_ms']} ms). "
            f"Longest pause in completions (all partitions): {_fmt(recovery.get('longest_pause_in_completions_ms'))} ms. "
            f"{recovery['lost']} of {recovery['sagas_started']:,} sagas did not end.",
            "",
        ]
    memory = results.get("memory")
    if memory:
        lines += [
            "## 6. Memory per live saga",
            "",
            f"{memory['live_sagas']:,} live sagas (after {memory['warmup_sagas']:,} warm-up ones): RSS "
            f"{memory['rss_before_bytes'] / 2**20:.1f} -> {memory['rss_after_bytes'] / 2**20:.1f} MiB, "
            f"**{memory['bytes_per_live_saga']:,} bytes per live saga**.",
            "",
        ]
    query = results.get("query")
    if query:
        lines += ["## 7. Status query", ""]
        warm = query.get("warmup")
        text = f"{query['sagas']:,} finished sagas in the log. "
        if warm:
            text += (
                f"Warming the read model took {warm['seconds']} s ({warm['records_per_s']:,} records/s; a cold cache's first "
                f"query catches up one partition: {warm['cold_first_query_s']} s). "
            )
        text += f"Measured: {query.get('measured', '')}."
        lines += [text, ""]
        rows = []
        for name, key in (("saga status (fresh read model)", "status"), ("reused read model", "status_reused_model"), ("CLI subprocess", "cli")):
            s = query.get(key)
            if s and s.get("count"):
                rows.append([name, str(s["count"]), _fmt(s["p50_ms"], 1), _fmt(s["p90_ms"], 1), _fmt(s["p99_ms"], 1), _fmt(s["max_ms"], 1)])
        lines += _table(["Query", "Samples", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows)
    obs = results.get("observability")
    if obs:
        lines += ["## 8. Observability cost (1 manager)", ""]
        lines += [
            f"{obs['rate_per_s']:g} sagas/s for {obs['seconds']:g} s per mode, each on a fresh deployment. Metrics: "
            f"managers and participants serve /metrics (not scraped). Tracing: OTEL_TRACES_EXPORTER=console into the "
            f"processes' logs. CPU µs per saga, by process kind:",
            "",
        ]
        rows = []
        for mode, r in obs["modes"].items():
            cpu = r["cpu_us_per_saga"]
            over = r.get("overhead_vs_off")
            rows.append([mode, f"{r['completed']:,}/{r['sent']:,}", _fmt(cpu.get("managers")), _fmt(cpu.get("participants")),
                         _fmt(cpu.get("broker")), _fmt(cpu.get("total")), "" if over is None else f"{over:+.1%}"])
        lines += _table(["Mode", "Ended/sent", "Managers", "Participants", "Broker", "Total", "vs off"], rows)
    profile = lookup(results, "throughput.runs")
    for run in profile or []:
        prof = run.get("profile")
        if not prof:
            continue
        lines += ["## Profile (py-spy, 1 manager at saturation)", ""]
        if prof.get("error"):
            lines += [prof["error"], ""]
        for name in ("manager", "participant"):
            p = prof.get(name)
            if not p or not p.get("samples"):
                continue
            lines += [f"**{name}** ({p['view']}, {p['samples']:,} samples, stacks in `{p['file']}`)", ""]
            lines += _table(["Category", "Share"], [[k, f"{v:.1%}"] for k, v in p["categories"].items()])
            lines += _table(["Self time in", "Code", "Share"], [[f"`{t['frame']}`", f"`{t['code']}`", f"{t['share']:.1%}"] for t in p["top_self"]])
    errors = results.get("errors")
    if errors:
        lines += ["## Parts that failed", ""] + [f"* {k}: {v}" for k, v in errors.items()] + [""]
    lines += ["## Environment", "", "```", json.dumps(env, indent=2), "```", ""]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], out: Path) -> Path:
    path = out / MARKDOWN_NAME
    path.write_text(markdown(results))
    return path


# --- plots ------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The two PNGs; an empty list (and a note in the results) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.setdefault("notes", []).append("plots skipped: matplotlib is not installed (pip install 'sagalog[bench]')")
        return []
    paths = []
    title_suffix = f"({results.get('bench', {}).get('date', '')[:10]}{', quick' if results.get('bench', {}).get('quick') else ''})"
    latency = results.get("latency")
    if latency:
        paths.append(_latency_plot(plt, latency, out / LATENCY_PNG, title_suffix))
    tput = results.get("throughput")
    if tput:
        paths.append(_throughput_plot(plt, tput, results.get("ceiling", {}), out / THROUGHPUT_PNG, title_suffix))
    return paths


def _latency_plot(plt: Any, latency: dict[str, Any], path: Path, suffix: str) -> Path:
    levels = [lv for lv in latency["levels"] if not lv.get("skipped") and lv.get("count")]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"p50_ms": ("p50", "o-"), "p90_ms": ("p90", "s-"), "p99_ms": ("p99", "^-"), "max_ms": ("max", "x--")}
    xs = [lv["offered_per_s"] for lv in levels]
    for key, (label, style) in styles.items():
        ax.plot(xs, [lv[key] for lv in levels], style, label=label)
    for lv in levels:
        if not lv["sustained"]:
            ax.annotate("not sustained", (lv["offered_per_s"], lv["p50_ms"]), textcoords="offset points", xytext=(8, -4), color="red", fontsize=9)
    skipped = [lv["offered_per_s"] for lv in latency["levels"] if lv.get("skipped")]
    if 500 in xs or 500 in skipped:
        ax.plot([500], [50], marker="*", color="green", markersize=14, linestyle="none", label="target: p99 < 50 ms at 500/s")
    ax.axhline(50, color="green", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    for x in skipped:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, 0.02, f"{x}/s not run ", rotation=90, va="bottom", ha="right", fontsize=8, color="grey", transform=ax.get_xaxis_transform())
    ax.set_xlabel("offered load (sagas/s, open loop)")
    ax.set_ylabel("start-to-end latency (ms, log scale)")
    ax.set_title(f"Saga latency percentiles vs offered load, 1 manager {suffix}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _throughput_plot(plt: Any, tput: dict[str, Any], ceiling: dict[str, Any], path: Path, suffix: str) -> Path:
    runs = tput["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    xs = [str(r["replicas"]) for r in runs]
    values = [r["sagas_per_s"] for r in runs]
    bars = left.bar(xs, values, color=["tab:blue" if r["saturated"] else "tab:orange" for r in runs])
    for bar, r in zip(bars, runs, strict=True):
        cpu = r.get("cpu_us_per_saga", {}).get("total")
        label = f"{r['sagas_per_s']:,.0f}/s" + (f"\n{cpu:,.0f} µs CPU/saga" if cpu else "")
        left.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    top = max([3000, *values]) * 1.15
    left.axhline(3000, color="green", linestyle="--", label="target 3,000/s")
    if ceiling.get("produce_msgs_per_s"):
        bound = ceiling["produce_msgs_per_s"] / tput["messages_per_saga"]
        text = f"broker ceiling: {ceiling['produce_msgs_per_s']:,} msg/s / {tput['messages_per_saga']} msgs per saga = {bound:,.0f} sagas/s"
        if bound <= top:
            left.axhline(bound, color="red", linestyle=":", label=text)
        else:
            left.plot([], [], " ", label=text + " (off scale)")
    left.set_xlabel("manager replicas")
    left.set_ylabel("completed sagas/s (open loop, saturation point)")
    left.set_title(f"Throughput vs replicas {suffix}")
    left.set_ylim(0, top)
    left.legend(loc="upper right", fontsize=8)
    for r in runs:
        timeline = r.get("timeline") or []
        if timeline:
            right.plot([t for t, _ in timeline], [c for _, c in timeline], marker=".", label=f"{r['replicas']} manager(s), offered {r['offered_per_s']:,.0f}/s")
            right.axhline(r["offered_per_s"], linestyle=":", linewidth=1, color=right.lines[-1].get_color())
    right.set_xlabel("seconds since the first start")
    right.set_ylabel("sagas completed in that second")
    right.set_title("Completions per second in the best step (dotted: offered)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
