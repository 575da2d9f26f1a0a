"""The outputs of a run: ``bench.json`` (every figure), ``bench.md`` (tables, targets beside the
values), ``latency.png`` and ``throughput.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sagacli.bench.config import FIGURE_TARGETS, TARGETS, Target

JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"
LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"


def plot_name(base: str, broker: str | None = None) -> str:
    """``latency.png`` for the first broker, ``latency-NAME.png`` for another one (``--also``)."""
    if broker is None:
        return base
    stem, _, ext = base.rpartition(".")
    return f"{stem}-{broker}.{ext}"


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


# --- the figures of issue #10, per broker ----------------------------------------------------

#: CpuMeter group -> the process kind's name in ``figures``.
KINDS = {"broker": "broker", "managers": "managers", "participants": "participants", "bench": "load_generator"}
IDLE_KINDS = ("broker", "managers", "participants")


def _by_kind(cpu: dict[str, Any] | None, kinds: Any = KINDS) -> dict[str, Any]:
    """Per process kind (None where not measured: the broker without a pid)."""
    cpu = cpu or {}
    if isinstance(kinds, dict):
        return {name: cpu.get(group) for group, name in kinds.items()}
    return {name: cpu.get(name) for name in kinds}


def figures_for(section: dict[str, Any], *, broker_measured: bool) -> dict[str, Any]:
    """One broker's ``figures``: a key for every figure of issue #10's table (None when its part did
    not run or failed), with units in the key names. CPU is per completed saga, all threads of each
    process; ``load_generator`` is the bench process (generator and log tailer; at 100/s also the
    hop tracer)."""
    runs = lookup(section, "throughput.runs") or []
    best = max(runs, key=lambda r: r.get("sagas_per_s", 0), default=None) or {}
    at100 = lookup(section, "latency.at_100") or {}
    at500 = lookup(section, "latency.at_500") or {}
    idle = section.get("idle") or {}
    over = section.get("overload") or {}
    recovery = section.get("recovery") or {}

    def sustained(level: dict[str, Any]) -> bool | None:
        if not level:
            return None
        return bool(level.get("sustained")) and not level.get("skipped")

    cpu100 = at100.get("cpu_us_per_saga") or {}
    cpu_best = best.get("cpu_us_per_saga") or {}
    cpu_over = over.get("cpu_us_per_saga") or {}
    idle_cores = idle.get("cores") or {}
    return {
        "broker_cpu_measured": broker_measured,
        # 3-step no-op sagas/s (the best replica count), and its CPU
        "throughput_sagas_per_s": lookup(section, "throughput.best_sagas_per_s"),
        "throughput_managers": best.get("replicas"),
        "throughput_saturated": best.get("saturated"),
        "cpu_us_per_saga_at_saturation": cpu_best.get("total"),
        "cpu_us_per_saga_at_saturation_by_kind": _by_kind(cpu_best),
        # latency
        "p99_ms_at_500": at500.get("p99_ms"),
        "p50_ms_at_500": at500.get("p50_ms"),
        "sustained_at_500": sustained(at500),
        "p50_ms_at_100": at100.get("p50_ms"),
        "p99_ms_at_100": at100.get("p99_ms"),
        "sustained_at_100": sustained(at100),
        # CPU per saga at 100/s, all processes
        "cpu_us_per_saga_at_100": cpu100.get("total"),
        "cpu_us_per_saga_at_100_by_kind": _by_kind(cpu100),
        # replay, memory, takeover
        "replay_records_per_s": lookup(section, "replay.records_per_s"),
        "memory_bytes_per_live_saga": lookup(section, "memory.bytes_per_live_saga"),
        "takeover_after_kill_ms": recovery.get("progress_after_kill_ms"),
        "takeover_target_ms": recovery.get("target_ms"),
        "takeover_session_timeout_ms": recovery.get("session_timeout_ms"),
        "takeover_sagas_lost": recovery.get("lost"),
        # idle deployment
        "idle_cpu_cores": idle.get("total_cores"),
        "idle_cpu_cores_by_kind": _by_kind(idle_cores, IDLE_KINDS),
        "idle_seconds": idle.get("seconds"),
        "idle_broker_baseline_cores": idle.get("broker_baseline_cores"),
        # 2x overload
        "overload_capacity_per_s": over.get("capacity_per_s"),
        "overload_offered_per_s": over.get("offered_per_s"),
        "overload_completed_per_s": over.get("completed_per_s"),
        "overload_completion_share": over.get("completion_share"),
        "overload_step_retries": over.get("step_retries"),
        "overload_aborted": over.get("aborted"),
        "overload_admitted_p99_ms": (over.get("admitted") or {}).get("p99_ms"),
        "overload_p99_ms": (over.get("latency") or {}).get("p99_ms"),
        "overload_step_timeout_ms": over["step_timeout_s"] * 1000 if over.get("step_timeout_s") else None,
        "overload_cpu_us_per_saga": cpu_over.get("total"),
        "overload_cpu_us_per_saga_by_kind": _by_kind(cpu_over),
        # context
        "broker_produce_msgs_per_s": lookup(section, "ceiling.produce_msgs_per_s"),
        "status_query_p99_ms": lookup(section, "query.status_p99_ms"),
    }


def figure_checks(figures: dict[str, Any], *, embedded: bool) -> list[dict[str, Any]]:
    """One row per figure of issue #10's table: its target, the value, met or not, and why."""
    rows = []
    for t in FIGURE_TARGETS:
        value = figures.get(t.key)
        bound = t.bound_for(figures, embedded)
        met = t.met(value, bound) if isinstance(value, int | float) and bound is not None else None
        note = ""
        if t.key == "throughput_sagas_per_s" and figures.get("throughput_managers"):
            note = f"{figures['throughput_managers']} manager(s)" + ("" if figures.get("throughput_saturated") else "; not saturated")
        elif t.key in ("p99_ms_at_500", "p50_ms_at_100"):
            rate = t.key.rsplit("_", 1)[1]
            if figures.get(f"sustained_at_{rate}") is False:
                met, note = False, f"{rate}/s not sustained" if value is not None else "not run: a lower load was not sustained"
        elif t.key in ("cpu_us_per_saga_at_100", "idle_cpu_cores") and not figures.get("broker_cpu_measured"):
            met, note = None, "broker CPU n/a (no local pid): the value leaves it out"
        elif t.key == "takeover_after_kill_ms" and bound is not None:
            note = f"session timeout {figures.get('takeover_session_timeout_ms')} ms + 1 s = {bound:,.0f} ms"
            if figures.get("takeover_sagas_lost"):
                note += f"; {figures['takeover_sagas_lost']} sagas lost"
        elif t.key == "overload_completion_share" and value is not None:
            retries, aborted = figures.get("overload_step_retries") or 0, figures.get("overload_aborted") or 0
            admitted, limit = figures.get("overload_admitted_p99_ms"), figures.get("overload_step_timeout_ms")
            bounded = admitted is not None and limit is not None and admitted < limit
            met = bool(met) and retries == 0 and aborted == 0 and bounded
            note = (
                f"{_fmt(figures.get('overload_completed_per_s'))}/s of {_fmt(figures.get('overload_capacity_per_s'))}/s; "
                f"{retries} step retries, {aborted} aborted; admitted p99 {_fmt(admitted)} ms"
            )
            if value > 1.1 and met:
                # More completions than the capacity measured before: the offer was not beyond capacity.
                met = None
                note += "; not judged: completions exceeded the capacity measured by the throughput part"
        rows.append(
            {"key": t.key, "label": t.label, "target": t.text, "unit": t.unit, "bound": bound, "value": value, "met": met, "note": note}
        )
    return rows


#: Rows of the side-by-side table after the targets: (label, key in ``figures`` (dotted), unit).
DETAIL_ROWS: tuple[tuple[str, str, str], ...] = (
    ("CPU per saga at 100/s: broker", "cpu_us_per_saga_at_100_by_kind.broker", "µs"),
    ("CPU per saga at 100/s: managers", "cpu_us_per_saga_at_100_by_kind.managers", "µs"),
    ("CPU per saga at 100/s: participants", "cpu_us_per_saga_at_100_by_kind.participants", "µs"),
    ("CPU per saga at 100/s: load generator", "cpu_us_per_saga_at_100_by_kind.load_generator", "µs"),
    ("CPU per saga at saturation: total", "cpu_us_per_saga_at_saturation", "µs"),
    ("CPU per saga at saturation: broker", "cpu_us_per_saga_at_saturation_by_kind.broker", "µs"),
    ("CPU per saga at saturation: managers", "cpu_us_per_saga_at_saturation_by_kind.managers", "µs"),
    ("CPU per saga at saturation: participants", "cpu_us_per_saga_at_saturation_by_kind.participants", "µs"),
    ("CPU per saga at saturation: load generator", "cpu_us_per_saga_at_saturation_by_kind.load_generator", "µs"),
    ("Idle CPU: broker", "idle_cpu_cores_by_kind.broker", "cores"),
    ("Idle CPU: manager", "idle_cpu_cores_by_kind.managers", "cores"),
    ("Idle CPU: participant", "idle_cpu_cores_by_kind.participants", "cores"),
    ("Idle CPU: the broker alone, before the deployment", "idle_broker_baseline_cores", "cores"),
    ("p99 at 100/s", "p99_ms_at_100", "ms"),
    ("p50 at 500/s", "p50_ms_at_500", "ms"),
    ("Overload: completed/s (capacity x2 offered)", "overload_completed_per_s", "sagas/s"),
    ("Overload: step retries (timeouts)", "overload_step_retries", ""),
    ("Overload: admitted p99", "overload_admitted_p99_ms", "ms"),
    ("Overload: CPU per saga, total", "overload_cpu_us_per_saga", "µs"),
    ("Broker ceiling, produce", "broker_produce_msgs_per_s", "msg/s"),
    ("Status query p99", "status_query_p99_ms", "ms"),
)


def comparison(brokers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The side-by-side table: one row per figure, one value (and verdict) per broker."""
    names = list(brokers)
    rows: list[dict[str, Any]] = []
    checks = {name: {c["key"]: c for c in b.get("figure_targets", [])} for name, b in brokers.items()}
    for t in FIGURE_TARGETS:
        rows.append(
            {
                "key": t.key, "label": t.label, "unit": t.unit, "target": t.text,
                "values": {n: checks[n].get(t.key, {}).get("value") for n in names},
                "met": {n: checks[n].get(t.key, {}).get("met") for n in names},
            }
        )  # fmt: skip
    for label, key, unit in DETAIL_ROWS:
        rows.append(
            {"key": key, "label": label, "unit": unit, "target": None, "values": {n: lookup(brokers[n].get("figures", {}), key) for n in names}}
        )
    return {"brokers": names, "rows": rows}


#: Keys of a broker's part results (top level for the first broker, under ``brokers.NAME`` for another).
PART_KEYS = ("ceiling", "idle", "throughput", "latency", "overload", "replay", "recovery", "memory", "query", "observability")


def combine(results: dict[str, Any], sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Put the brokers' sections (from :func:`sagacli.bench.runner._measure`) into ``results``.

    The first broker's part results, errors, MISSION.md ``targets``, ``figures`` and
    ``figure_targets`` go to the top level, exactly where a run without ``--also`` has them;
    ``brokers`` maps every broker's name to its section (the first one's says ``results: top
    level``; another's holds its parts, errors, targets, figures and figure_targets); with more
    than one broker, ``comparison`` is the side-by-side table of their figures.
    """
    first = sections[0]
    for key in PART_KEYS:
        if key in first:
            results[key] = first.pop(key)
    results["bench"]["part_seconds"] = first.get("part_seconds", {})
    results["bench"].setdefault("config", {}).update(first.pop("config_changes", {}))
    if first.get("errors"):
        results["errors"] = first.pop("errors")
        results["tracebacks"] = first.pop("tracebacks", {})
    results["targets"] = targets_for(results)
    results["figures"] = figures_for(results, broker_measured=first.get("broker_pid") is not None)
    results["figure_targets"] = figure_checks(results["figures"], embedded=bool(first.get("embedded")))
    first.update(figures=results["figures"], figure_targets=results["figure_targets"], results="top level")
    for section in sections[1:]:
        section["targets"] = targets_for({"bench": results["bench"], **section})
        section["figures"] = figures_for(section, broker_measured=section.get("broker_pid") is not None)
        section["figure_targets"] = figure_checks(section["figures"], embedded=bool(section.get("embedded")))
    results["brokers"] = {section["name"]: section for section in sections}
    if len(sections) > 1:
        results["comparison"] = comparison(results["brokers"])
    return results


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


def _section_lines(results: dict[str, Any], h: str, plots_of: str | None = None) -> list[str]:
    """The MISSION.md targets and every part's tables of one broker; ``h`` is the heading level."""
    lines = [f"{h} Targets (MISSION.md)", ""]
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
            f"{h} 1. Broker ceiling",
            "",
            f"Raw {ceiling['message_bytes']}-byte messages, {ceiling['messages']:,} of them, {ceiling['partitions']} partitions "
            f"({ceiling['producer']}): produce **{ceiling['produce_msgs_per_s']:,} msg/s** ({ceiling['produce_mb_per_s']} MB/s), "
            f"consume **{ceiling['consume_msgs_per_s']:,} msg/s** ({ceiling['consume_mb_per_s']} MB/s).",
            "",
        ]
    idle = results.get("idle")
    if idle:
        lines += [f"{h} Idle deployment (no traffic)", ""]
        cores = idle.get("cores", {})
        lines += [
            f"The broker, {idle['managers']} manager and {idle['participant_processes']} participant process on fresh topics, "
            f"after a few warm-up sagas, with the bench's own clients closed; CPU (utime + stime, all threads) over "
            f"{_fmt(idle['seconds'], 1)} s: **{_fmt(idle['total_cores'], 3)} core** in total"
            + ("" if idle.get("broker_measured") else " (the broker's CPU is not measured: no local pid for it)")
            + "."
            + (
                f" The broker alone, before the deployment started: {_fmt(idle['broker_baseline_cores'], 3)} core "
                f"(after waiting {_fmt(idle.get('broker_quiet_wait_s'), 1)} s for it to be quiet, under 0.05 core)."
                if idle.get("broker_baseline_cores") is not None
                else ""
            ),
            "",
        ]
        lines += _table(["Process kind", "Cores"], [[kind, _fmt(value, 4)] for kind, value in cores.items()])
    tput = results.get("throughput")
    if tput:
        lines += [
            f"{h} 2. Throughput (saturation, open loop)",
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
        lines += [f"![throughput]({plot_name(THROUGHPUT_PNG, plots_of)})", ""]
    latency = results.get("latency")
    if latency:
        lines += [f"{h} 3. Latency at fixed offered loads (1 manager)", ""]
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
        lines += [f"![latency]({plot_name(LATENCY_PNG, plots_of)})", ""]
    over = results.get("overload")
    if over:
        admitted, lat, cpu = over.get("admitted", {}), over.get("latency", {}), over.get("cpu_us_per_saga", {})
        lines += [
            f"{h} Overload ({over['factor']:g}x capacity, 1 manager)",
            "",
            f"Capacity {_fmt(over['capacity_per_s'])} sagas/s ({over['capacity_from']}); offered **{_fmt(over['offered_per_s'])}/s** "
            f"for {_fmt(over['seconds'], 1)} s, open loop: **{_fmt(over['completed_per_s'])} completed/s** in the steady window "
            f"(**{_fmt((over.get('completion_share') or 0) * 100)} %** of capacity); {over['step_retries']:,} step retries "
            f"(timeouts), {over['aborted']:,} aborted; {over['completed']:,} of {over['sent']:,} ended"
            f"{'' if over['drained'] else ' (the backlog had not drained when the part stopped)'}. "
            f"Admitted (SagaBegun -> SagaEnded) p50 / p99 {_fmt(admitted.get('p50_ms'))} / **{_fmt(admitted.get('p99_ms'))} ms** "
            f"(step timeout {_fmt(over.get('step_timeout_s'), 1)} s); start-to-end p50 / p99 {_fmt(lat.get('p50_ms'))} / "
            f"{_fmt(lat.get('p99_ms'))} ms. CPU µs per saga: "
            + " / ".join(f"{k} {_fmt(cpu.get(k))}" for k in ("managers", "participants", "broker", "bench", "total") if k in cpu)
            + ".",
            "",
        ]
    replay = results.get("replay")
    if replay:
        split = replay.get("in_process_split", {})
        lines += [
            f"{h} 4. Replay on takeover",
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
            f"{h} 5. Recovery after kill -9 (3 managers under load)",
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
            f"{h} 6. Memory per live saga",
            "",
            f"{memory['live_sagas']:,} live sagas (after {memory['warmup_sagas']:,} warm-up ones): RSS "
            f"{memory['rss_before_bytes'] / 2**20:.1f} -> {memory['rss_after_bytes'] / 2**20:.1f} MiB, "
            f"**{memory['bytes_per_live_saga']:,} bytes per live saga**.",
            "",
        ]
    query = results.get("query")
    if query:
        lines += [f"{h} 7. Status query", ""]
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
        lines += [f"{h} 8. Observability cost (1 manager)", ""]
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
        lines += [f"{h} Profile (py-spy, 1 manager at saturation)", ""]
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
        lines += [f"{h} Parts that failed", ""] + [f"* {k}: {v}" for k, v in errors.items()] + [""]
    return lines


def value_text(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return _fmt(value)
    if unit == "cores":
        return f"{value:.3f} cores"
    if unit == "of capacity":
        return f"{value:.0%} of capacity"
    digits = 1 if isinstance(value, float) and abs(value) < 100 else 0
    return f"{_fmt(value, digits)} {unit}".strip()


def _verdict(check: dict[str, Any]) -> str:
    """Met, not met, not measured (no value) or not judged (a value, but see the note)."""
    if check.get("met") is None and check.get("value") is not None:
        return "not judged"
    return _met(check.get("met"))


def _figures_lines(results: dict[str, Any]) -> list[str]:
    """Issue #10's table: the targets, then CPU by process kind and other details; one value column
    per broker (with ``--also``), or Measured / Met? / Note for one broker."""
    brokers = results.get("brokers") or {}
    comp = results.get("comparison") or comparison(brokers)
    lines = [
        "## Figures (issue #10)",
        "",
        "CPU is per completed saga (µs, all threads of each process kind) or in cores (idle); *load generator* is the "
        "bench process (generator and log tailer; at 100/s also the hop tracer).",
        "",
    ]
    if len(brokers) <= 1:
        name = next(iter(brokers), None)
        checks = {c["key"]: c for c in (brokers[name].get("figure_targets", []) if name else results.get("figure_targets", []))}
        rows = []
        for row in comp["rows"]:
            check = checks.get(row["key"])
            value = next(iter(row["values"].values()), None) if row["values"] else None
            if check is not None:
                rows.append([row["label"], row["target"], value_text(check["value"], row["unit"]), _verdict(check), check["note"]])
            else:
                rows.append([row["label"], "", value_text(value, row["unit"]), "", ""])
        lines += _table(["Figure", "Target", "Measured", "Met?", "Note"], rows)
        met = [c for c in checks.values() if c["met"]]
        lines += [f"{len(met)} of {len(checks)} targets of issue #10 met.", ""]
        return lines
    names = comp["brokers"]
    header = ["Figure", "Target"] + [f"{n} ({brokers[n].get('broker_short') or brokers[n].get('broker', '')})" for n in names]
    rows = []
    for row in comp["rows"]:
        cells = [row["label"], row["target"] or ""]
        for n in names:
            text = value_text(row["values"].get(n), row["unit"])
            if row["target"] is not None:
                text += " " + _verdict({"value": row["values"].get(n), "met": row.get("met", {}).get(n)})
            cells.append(text)
        rows.append(cells)
    lines += _table(header, rows)
    for n in names:
        broker_checks = brokers[n].get("figure_targets", [])
        met_count = sum(1 for c in broker_checks if c["met"])
        notes = "; ".join(f"{c['key']}: {c['note']}" for c in broker_checks if c["note"])
        lines += [f"* **{n}**: {met_count} of {len(broker_checks)} targets met. {notes}"]
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    bench, env = results.get("bench", {}), results.get("environment", {})
    brokers = results.get("brokers") or {}
    if len(brokers) > 1:
        broker_text = "Brokers: " + "; ".join(f"`{n}` {b.get('broker', '?')}" for n, b in brokers.items())
    else:
        first: dict[str, Any] = next(iter(brokers.values()), {})
        broker_text = f"Broker: {env.get('broker', '?')}" + (f" (broker CPU: {first['broker_cpu']})" if first.get("broker_cpu") else "")
    lines = [
        f"# saga bench results ({bench.get('date', '?')})",
        "",
        f"Command: `{bench.get('command', 'saga bench')}`{' (quick mode: smaller sizes, shorter runs)' if bench.get('quick') else ''}; "
        f"took {_fmt(bench.get('duration_s'))} s. {broker_text}. "
        f"{env.get('cpu_count', '?')} CPUs ({env.get('cpu_model', '?')}), load average before/after "
        f"{env.get('loadavg_start', '?')} / {env.get('loadavg_end', '?')}.",
        "",
    ]
    lines += _figures_lines(results)
    if len(brokers) <= 1:
        lines += _section_lines(results, "##")
    else:
        for i, (name, b) in enumerate(brokers.items()):
            lines += [
                f"## Broker `{name}`: {b.get('broker', '?')}",
                "",
                f"Bootstrap {b.get('bootstrap')}; broker CPU {b.get('broker_cpu')}; parts took "
                + ", ".join(f"{k} {v:g} s" for k, v in (b.get("part_seconds") or {}).items())
                + ".",
                "",
            ]
            lines += _section_lines(results if i == 0 else b, "###", None if i == 0 else name)
    lines += ["## Environment", "", "```", json.dumps(env, indent=2), "```", ""]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], out: Path) -> Path:
    path = out / MARKDOWN_NAME
    path.write_text(markdown(results))
    return path


# --- plots ------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The two PNGs of each broker; an empty list (and a note in the results) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.setdefault("notes", []).append("plots skipped: matplotlib is not installed (pip install 'sagalog[bench]')")
        return []
    paths = []
    sections: list[tuple[dict[str, Any], str | None]] = [(results, None)]
    sections += [(b, name) for i, (name, b) in enumerate((results.get("brokers") or {}).items()) if i > 0]
    for section, name in sections:
        title_suffix = f"({results.get('bench', {}).get('date', '')[:10]}{', quick' if results.get('bench', {}).get('quick') else ''}"
        title_suffix += f", {name})" if name else ")"
        latency = section.get("latency")
        if latency:
            paths.append(_latency_plot(plt, latency, out / plot_name(LATENCY_PNG, name), title_suffix))
        tput = section.get("throughput")
        if tput:
            paths.append(_throughput_plot(plt, tput, section.get("ceiling", {}), out / plot_name(THROUGHPUT_PNG, name), title_suffix))
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
