"""What the benchmark runs: the parts, their sizes (full and quick), and the targets they meet or not."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

#: The parts in the order they run. ``--skip`` takes these names.
#: ``idle`` comes right after ``ceiling``: the ceiling's traffic has warmed a JVM broker's JIT, and no
#: topic deleted by an earlier part is being removed yet (Apache Kafka removes a deleted topic's files
#: a minute later, ``file.delete.delay.ms``): both would be charged to the idle deployment.
PARTS = ("ceiling", "idle", "throughput", "latency", "overload", "replay", "recovery", "memory", "query", "observability")


@dataclass(frozen=True)
class Target:
    """One target of MISSION.md ("Targets"): the figure it applies to and the bound."""

    key: str  # dotted path into the results JSON
    label: str
    bound: float
    higher_is_better: bool
    unit: str
    note: str = ""

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.higher_is_better else value <= self.bound

    @property
    def text(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return f"{sign} {self.bound:,.0f} {self.unit}".replace(".0 ", " ")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and durations of one run. :meth:`for_quick` takes about 2.5 minutes per broker on 2 cores."""

    quick: bool = False
    partitions: int = 6
    session_timeout_ms: int = 6000
    participant_processes: int = 1
    # 1. broker ceiling
    ceiling_messages: int = 1_000_000
    ceiling_message_bytes: int = 200
    # 2. throughput: a closed-loop probe (a fixed number of sagas in flight) estimates capacity,
    #    then open-loop steps of saturation_seconds from 0.8x the probe, x saturation_step each,
    #    until one is not sustained
    probe_seconds: float = 8.0
    probe_in_flight: int = 500
    saturation_seconds: float = 10.0
    saturation_step: float = 1.15
    saturation_steps: int = 6
    replicas: tuple[int, ...] = (1, 2)
    # 3. latency: offered loads (sagas/s), seconds per load
    latency_rates: tuple[int, ...] = (100, 500, 1000)
    latency_seconds: float = 15.0
    # idle: a deployment (1 manager, 1 participant) with no traffic, its CPU measured this long
    idle_seconds: float = 20.0
    # overload: overload_factor times the 1-manager capacity, offered for overload_seconds
    overload_factor: float = 2.0
    overload_seconds: float = 30.0
    #: The overload part's managers admit about capacity x this many seconds of live sagas
    #: (--max-live-sagas, split over the partitions): admitted sagas then finish within about that.
    overload_admission_s: float = 1.0
    # 4. replay: log records on the partition taken over; share of unfinished sagas among them
    replay_records: int = 100_000
    replay_live_share: float = 0.1
    # 5. recovery: offered load while one of three managers is killed
    recovery_rate: int = 200
    recovery_session_timeout_ms: int = 6000
    # 6. memory: live sagas held by one manager (after a warm-up of memory_warmup sagas)
    memory_sagas: int = 50_000
    memory_warmup: int = 1000
    # 7. query: sagas in the log, single-saga queries timed
    query_sagas: int = 1_000_000
    query_samples: int = 200
    query_cli_samples: int = 10
    # generous bounds for waiting on the system under test
    warmup_sagas: int = 50
    drain_timeout_s: float = 30.0
    #: 8. Observability cost: this load, this long, with metrics and tracing off / on.
    observability_rate: float = 100.0
    observability_seconds: float = 10.0
    skip: frozenset[str] = field(default_factory=frozenset)
    profile: bool = False
    profile_seconds: float = 15.0

    @classmethod
    def full(cls, **overrides: object) -> BenchConfig:
        return replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def for_quick(cls, **overrides: object) -> BenchConfig:
        quick = cls(
            quick=True,
            session_timeout_ms=3000,
            ceiling_messages=200_000,
            probe_seconds=3.0,
            saturation_seconds=3.5,
            saturation_steps=3,
            latency_rates=(100, 500, 1000),
            latency_seconds=3.0,
            idle_seconds=5.0,
            overload_seconds=6.0,
            replay_records=10_000,
            recovery_rate=150,
            recovery_session_timeout_ms=3000,
            memory_sagas=5000,
            memory_warmup=300,
            query_sagas=20_000,
            query_samples=40,
            query_cli_samples=3,
            warmup_sagas=20,
            drain_timeout_s=6.0,
            observability_seconds=3.0,
            profile_seconds=8.0,
        )
        return replace(quick, **overrides)  # type: ignore[arg-type]

    def scaled(self, factor: float) -> BenchConfig:
        """Every size and duration times ``factor`` (with floors): for tests that only check the plumbing."""
        if factor == 1.0:
            return self

        def n(value: int, floor: int) -> int:
            return max(floor, int(value * factor))

        def s(value: float, floor: float) -> float:
            return max(floor, value * factor)

        return replace(
            self,
            ceiling_messages=n(self.ceiling_messages, 5000),
            probe_seconds=s(self.probe_seconds, 1.5),
            probe_in_flight=n(self.probe_in_flight, 50),
            saturation_seconds=s(self.saturation_seconds, 2.0),
            latency_seconds=s(self.latency_seconds, 1.5),
            idle_seconds=s(self.idle_seconds, 2.0),
            overload_seconds=s(self.overload_seconds, 2.0),
            replay_records=n(self.replay_records, 500),
            recovery_rate=n(self.recovery_rate, 40),
            memory_sagas=n(self.memory_sagas, 300),
            memory_warmup=n(self.memory_warmup, 50),
            query_sagas=n(self.query_sagas, 500),
            query_samples=n(self.query_samples, 10),
            query_cli_samples=n(self.query_cli_samples, 1),
            warmup_sagas=n(self.warmup_sagas, 5),
            profile_seconds=s(self.profile_seconds, 2.0),
            observability_seconds=s(self.observability_seconds, 1.5),
        )

    def runs(self, part: str) -> bool:
        return part not in self.skip


#: MISSION.md "Targets", keyed by where the figure is in the results JSON.
TARGETS: tuple[Target, ...] = (
    Target("throughput.best_sagas_per_s", "Throughput, 3-step sagas completed/s (no-op participants)", 3000, True, "sagas/s"),
    Target("latency.at_500.p99_ms", "Latency p99 start-to-end at 500 sagas/s", 50, False, "ms"),
    Target(
        "recovery.progress_after_kill_ms",
        "Recovery: killed manager's sagas progress again",
        0,  # replaced by session timeout + 1 s of the run (see report.targets_for)
        False,
        "ms",
        "session timeout + 1 s",
    ),
    Target("replay.records_per_s", "Replay of a partition on takeover", 200_000, True, "records/s"),
    Target("memory.bytes_per_live_saga", "Memory per live saga in a manager", 2048, False, "bytes"),
    Target("query.status_p99_ms", "Status query for one saga (p99)", 100, False, "ms"),
)


@dataclass(frozen=True)
class FigureTarget:
    """One row of issue #10's table: a key of a broker's ``figures``, its bound, how it compares.

    ``bound`` None: the bound is another figure (``bound_key``, e.g. the takeover's session timeout
    + 1 s); ``other_bound``: the bound on a broker that is not the embedded one, when it differs.
    """

    key: str
    label: str
    unit: str
    op: str  # ">=", "<" or "<="
    bound: float | None
    text: str
    other_bound: float | None = None
    bound_key: str | None = None

    def bound_for(self, figures: dict[str, object], embedded: bool) -> float | None:
        if self.bound_key is not None:
            value = figures.get(self.bound_key)
            return float(value) if isinstance(value, int | float) else None
        if not embedded and self.other_bound is not None:
            return self.other_bound
        return self.bound

    def met(self, value: float, bound: float) -> bool:
        if self.op == ">=":
            return value >= bound
        if self.op == "<":
            return value < bound
        return value <= bound


#: Issue #10's table, keyed by the names of a broker's ``figures`` in bench.json.
FIGURE_TARGETS: tuple[FigureTarget, ...] = (
    FigureTarget("throughput_sagas_per_s", "3-step no-op sagas/s, everything on this machine", "sagas/s", ">=", 3000, ">= 3,000 sagas/s"),
    FigureTarget("p99_ms_at_500", "p99 start-to-end at 500 sagas/s offered", "ms", "<", 50, "< 50 ms (500/s sustained)"),
    FigureTarget("p50_ms_at_100", "p50 start-to-end at 100 sagas/s", "ms", "<", 40, "< 40 ms embedded, < 25 ms other brokers", other_bound=25),
    FigureTarget("cpu_us_per_saga_at_100", "CPU per saga at 100 sagas/s, all processes", "µs", "<", 2000, "< 2,000 µs"),
    FigureTarget("replay_records_per_s", "Replay of a partition on takeover", "records/s", ">=", 200_000, ">= 200,000 records/s"),
    FigureTarget("memory_bytes_per_live_saga", "Memory per live saga in a manager", "bytes", "<", 2048, "< 2,048 bytes"),
    FigureTarget(
        "takeover_after_kill_ms", "Takeover after kill -9 of a manager", "ms", "<=", None, "<= session timeout + 1 s",
        bound_key="takeover_target_ms",
    ),
    FigureTarget("idle_cpu_cores", "Idle deployment CPU (broker, 1 manager, 1 participant), no traffic", "cores", "<", 0.02, "< 0.02 core"),
    FigureTarget(
        "overload_completion_share", "Offered 2x capacity: completions as a share of capacity", "of capacity", ">=", 0.9,
        ">= 0.9, no step timeout, admitted p99 < step timeout",
    ),
)
