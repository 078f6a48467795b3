"""opsrun's ledger against the raw database, against Procrastinate, and at scale.

Run with ``tox -e bench`` (or ``python bench/ledger_throughput.py``; ``--quick`` for a smoke run,
``--help`` for the options). It creates its own throwaway Postgres databases
(``opsrun_bench_<random>_*``, via libpq defaults unless ``--server-url``) and a temporary SQLite
file, and drops them at the end. Figures and their meaning: ``bench/README.md``.

Every comparison is made in one run on one machine: rounds of the compared paths are interleaved
and the ratio reported is the median over rounds of the per-round ratio, so load from elsewhere on
the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import peer
import scale
from harness import (
    DEFAULT_SERVER_URL,
    Databases,
    Series,
    TripCount,
    WireTrace,
    WorkerPool,
    fmt_rate,
    interleaved,
    machine_description,
    paired_ratio,
    statement_counter,
    table,
)
from workloads import WorkerEnv

TRIP_JOBS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="opsrun ledger throughput against raw psycopg / sqlite3 and Procrastinate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per path (medians are taken)")
    p.add_argument(
        "--processes", default="1,4,16", help="worker processes for the full path, comma-separated"
    )
    p.add_argument(
        "--dispatch-processes",
        default="1,4",
        help="worker processes for dispatch alone and Procrastinate",
    )
    p.add_argument(
        "--server-url",
        default=os.environ.get("OPSRUN_BENCH_SERVER_URL", DEFAULT_SERVER_URL),
        help="Postgres server (SQLAlchemy URL of a maintenance database) to create the "
        "throwaway databases on; env OPSRUN_BENCH_SERVER_URL",
    )
    p.add_argument(
        "--scale-rows",
        default="0,100000",
        help="completed runs bulk-loaded for the scale figures, comma-separated",
    )
    p.add_argument(
        "--full-scale",
        action="store_true",
        help="add 1,000,000 completed runs to --scale-rows (loading takes a minute or more)",
    )
    p.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="on",
        help="'off' (a session setting on every benchmark connection) takes the server's WAL "
        "flush out of the Postgres figures: a diagnostic for a machine with slow or busy disks, "
        "not how production runs",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the Procrastinate comparison")
    p.add_argument("--no-scale", action="store_true", help="skip the scale figures")
    p.add_argument("--profile", action="store_true", help="also profile the full path")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 0.5, 2
        args.processes, args.dispatch_processes, args.scale_rows = "1,4", "1", "0,10000"
    args.processes = _ints(args.processes)
    args.dispatch_processes = _ints(args.dispatch_processes)
    args.scale_rows = _ints(args.scale_rows)
    if args.full_scale and 1_000_000 not in args.scale_rows:
        args.scale_rows.append(1_000_000)
    if 0 not in args.scale_rows:
        args.scale_rows.insert(0, 0)
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def say(text: str) -> None:
    print(text, flush=True)


# -- round trips -----------------------------------------------------------------------------------


def count_round_trips(config: dict[str, Any]) -> dict[str, TripCount]:
    """Statements and wire round trips per job, counted in this process on the 'full' database."""
    env = WorkerEnv(config, index=999)
    counts: dict[str, TripCount] = {}
    try:
        for name in (
            "opsrun-full",
            "raw-full",
            "opsrun-inline",
            "raw-inline",
            "opsrun-dispatch",
            "raw-dispatch",
            "opsrun-dispatch-dup",
            "raw-dispatch-dup",
        ):
            step = env.workload(f"{name}@full")
            for _ in range(10):  # past psycopg's prepare threshold (5), as in a long-lived worker
                step()
            trace = WireTrace()
            try:
                if name.startswith("opsrun"):
                    engine = env.ledger("full").engine
                    detach = trace.attach_engine(engine)
                    try:
                        with statement_counter(engine) as statements:
                            jobs = sum(step() for _ in range(TRIP_JOBS))
                    finally:
                        detach()
                    executed = statements[0]
                else:
                    raw = env.raw("full")
                    trace.attach(raw.conn)
                    before = raw.executed
                    jobs = sum(step() for _ in range(TRIP_JOBS))
                    executed = raw.executed - before
                counts[name] = TripCount(jobs, executed, trace.count())
            finally:
                trace.close()
        # SQLite has no wire; count the statements (BEGIN IMMEDIATE is not counted)
        step = env.workload("opsrun-full@sqlite")
        step()
        engine = env.ledger("sqlite").engine
        with statement_counter(engine) as statements:
            jobs = sum(step() for _ in range(TRIP_JOBS))
        counts["opsrun-full@sqlite"] = TripCount(jobs, statements[0], None)
        step = env.workload("raw-full@sqlite")
        step()
        before = env.raw("sqlite").executed
        jobs = sum(step() for _ in range(TRIP_JOBS))
        counts["raw-full@sqlite"] = TripCount(jobs, env.raw("sqlite").executed - before, None)
    finally:
        env.close()
    return counts


def _per_dispatch(pair: TripCount, single: TripCount) -> tuple[float, float | None]:
    """Statements and wire round trips of the duplicate dispatch alone (pair minus the new one)."""
    pairs = pair.jobs / 2
    statements = pair.statements / pairs - single.statements_per_job
    wire = None
    if pair.wire is not None and single.wire_per_job is not None:
        wire = pair.wire / pairs - single.wire_per_job
    return statements, wire


# -- the run ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    dbs = Databases(args.server_url, synchronous_commit=args.synchronous_commit)
    failures: list[str] = []
    try:
        machine = machine_description(dbs.server)
        say(f"opsrun ledger benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
        say("machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()))
        say(
            f"rounds: {args.rounds} x {args.duration:g} s per path, interleaved; "
            f"Postgres synchronous_commit={args.synchronous_commit}; "
            "figures are medians over rounds, ratios medians of per-round ratios\n"
        )
        peer_version = None if args.no_peer else peer.available()
        if not args.no_peer and peer_version is None:
            say(
                "procrastinate is not installed: skipping the peer comparison (tox -e bench has it)"
            )

        say("setting up databases ...")
        dbs.postgres("full")
        dispatch_db = dbs.postgres("dispatch")
        dbs.sqlite("sqlite")
        if peer_version is not None:
            assert dispatch_db.conninfo is not None
            peer.apply_schema(dispatch_db.conninfo)
        scale_dbs = []
        load_seconds: dict[str, float] = {}
        if not args.no_scale:
            for rows in args.scale_rows:
                db = dbs.postgres(f"scale-{rows}")
                load_seconds[db.key] = scale.load_history(db, rows, say)
                scale_dbs.append(db)
        config = {"databases": dbs.config()}

        say("counting round trips ...")
        trips = count_round_trips(config)

        groups: dict[int, dict[str, Series]] = {}
        for level in sorted(set(args.processes) | set(args.dispatch_processes)):
            specs: list[list[str]] = []
            if level in args.processes:
                full = [
                    "opsrun-full@full",
                    "raw-full@full",
                    "opsrun-full@sqlite",
                    "raw-full@sqlite",
                ]
                if level == 1:
                    full += ["opsrun-inline@full", "raw-inline@full"]
                specs.append(full)
            if level in args.dispatch_processes:
                dispatch = [
                    "opsrun-dispatch@dispatch",
                    "raw-dispatch@dispatch",
                    "opsrun-dispatch-dup@dispatch",
                    "raw-dispatch-dup@dispatch",
                ]
                if peer_version is not None:
                    dispatch[2:2] = ["procrastinate-defer@dispatch"]
                    dispatch += ["procrastinate-defer-dup@dispatch"]
                specs.append(dispatch)
            if level == 1 and scale_dbs:
                specs.append([f"opsrun-full@{db.key}" for db in scale_dbs])
            say(f"\n{level} worker process(es) ...")
            groups[level] = {}
            with WorkerPool(level, config) as pool:
                for group in specs:
                    groups[level].update(
                        interleaved(
                            pool, group, rounds=args.rounds, duration=args.duration, progress=say
                        )
                    )
        reconciles = {}
        if scale_dbs:
            say("\ntiming reconcile ...")
            reconciles = scale.time_reconciles(scale_dbs, args.rounds, say)

        say("")
        failures += report(args, machine, trips, groups, reconciles, load_seconds, peer_version)
        if args.profile:
            import profile_full_path

            profile_full_path.profile(dbs.items["full"].url, jobs=1000, out=say)
            for kind in ("full", "inline", "dispatch", "dispatch-dup"):
                profile_full_path.experiments(
                    dbs.items["dispatch"],
                    kind=kind,
                    rounds=args.rounds,
                    jobs=200,
                    out=say,
                    peer=peer_version is not None,
                )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "machine": machine,
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "trips": {k: asdict(v) for k, v in trips.items()},
                        "series": {
                            f"{level}:{spec}": [asdict(r) for r in s.rounds]
                            for level, by_spec in groups.items()
                            for spec, s in by_spec.items()
                        },
                        "reconcile_ms": {k: v.times_ms for k, v in reconciles.items()},
                        "load_seconds": load_seconds,
                    },
                    indent=2,
                )
            )
    finally:
        say("\ndropping the benchmark databases ...")
        dbs.drop_all()
    say(f"done in {time.monotonic() - started:.0f} s")
    for failure in failures:
        say(f"FAILED: {failure}")
    return 1 if failures else 0


# -- the report ------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    machine: dict[str, str],
    trips: dict[str, TripCount],
    groups: dict[int, dict[str, Series]],
    reconciles: dict[str, scale.ReconcileTiming],
    load_seconds: dict[str, float],
    peer_version: str | None,
) -> list[str]:
    """Print every table; return the hard failures (round-trip counts over their bound)."""
    failures: list[str] = []
    targets: list[tuple[str, str, bool | None]] = []

    def get(level: int, spec: str) -> Series | None:
        return groups.get(level, {}).get(spec)

    # round trips
    def wire(count: TripCount | None) -> str:
        value = None if count is None else count.wire_per_job
        return "n/a" if value is None else f"{value:.1f}"

    dup_statements, dup_wire = _per_dispatch(trips["opsrun-dispatch-dup"], trips["opsrun-dispatch"])
    raw_dup_statements, raw_dup_wire = _per_dispatch(
        trips["raw-dispatch-dup"], trips["raw-dispatch"]
    )
    rows = [
        [
            "full path: dispatch -> claim -> complete",
            f"{trips['opsrun-full'].statements_per_job:.1f}",
            wire(trips["opsrun-full"]),
            f"{trips['raw-full'].statements_per_job:.1f}",
            wire(trips["raw-full"]),
        ],
        [
            "inline: ensure_and_claim -> complete",
            f"{trips['opsrun-inline'].statements_per_job:.1f}",
            wire(trips["opsrun-inline"]),
            f"{trips['raw-inline'].statements_per_job:.1f}",
            wire(trips["raw-inline"]),
        ],
        [
            "dispatch, new identity",
            f"{trips['opsrun-dispatch'].statements_per_job:.1f}",
            wire(trips["opsrun-dispatch"]),
            f"{trips['raw-dispatch'].statements_per_job:.1f}",
            wire(trips["raw-dispatch"]),
        ],
        [
            "dispatch, duplicate of an active run",
            f"{dup_statements:.1f}",
            "n/a" if dup_wire is None else f"{dup_wire:.1f}",
            f"{raw_dup_statements:.1f}",
            "n/a" if raw_dup_wire is None else f"{raw_dup_wire:.1f}",
        ],
        [
            "full path on SQLite (in-process)",
            f"{trips['opsrun-full@sqlite'].statements_per_job:.1f}",
            "-",
            f"{trips['raw-full@sqlite'].statements_per_job:.1f}",
            "-",
        ],
    ]
    say("Round trips per job (Postgres unless said; counted over 20 jobs)")
    say(
        "statements = SQLAlchemy cursor executions; wire = client waits for the server "
        "(every Query and Sync in libpq's protocol trace: BEGIN, COMMIT, the pool's ping count)\n"
    )
    say(table(["path", "opsrun stmts", "opsrun wire", "raw stmts", "raw wire"], rows))
    full_stmts = trips["opsrun-full"].statements_per_job
    inline_stmts = trips["opsrun-inline"].statements_per_job
    if full_stmts > 3:
        failures.append(f"the full path issued {full_stmts:.1f} statements per job (at most 3)")
    if inline_stmts != 2:
        failures.append(f"the inline path issued {inline_stmts:.1f} statements per job (not 2)")
    full_wire = trips["opsrun-full"].wire_per_job
    targets.append(
        (
            "round trips per job, full path <= 3",
            f"{full_stmts:.1f} statements, {wire(trips['opsrun-full'])} on the wire",
            full_wire is not None and full_wire <= 3,
        )
    )
    targets.append(
        (
            "inline path: 2 round trips per job",
            f"{inline_stmts:.1f} statements, {wire(trips['opsrun-inline'])} on the wire",
            trips["opsrun-inline"].wire_per_job == 2,
        )
    )

    # full path
    rows = []
    for level in sorted(groups):
        for backend, db in (("postgres", "full"), ("sqlite", "sqlite")):
            ops, raw = get(level, f"opsrun-full@{db}"), get(level, f"raw-full@{db}")
            if ops is None or raw is None:
                continue
            rows.append(
                [
                    level,
                    backend,
                    fmt_rate(ops.median),
                    fmt_rate(raw.median),
                    f"{paired_ratio(ops, raw):.2f}",
                    f"{ops.cpu_us:,.0f} / {raw.cpu_us:,.0f}",
                ]
            )
    say("\nFull path (dispatch -> claim -> complete with summary counts), jobs/s")
    say("raw = the same SQL via psycopg 3 autocommit / stdlib sqlite3 (WAL, synchronous=FULL)\n")
    say(
        table(
            ["procs", "backend", "opsrun", "raw", "opsrun/raw", "client CPU us/job opsrun / raw"],
            rows,
        )
    )
    for level, bound in ((1, 0.8), (4, 0.7)):
        ops, raw = get(level, "opsrun-full@full"), get(level, "raw-full@full")
        if ops and raw:
            ratio = paired_ratio(ops, raw)
            targets.append(
                (
                    f"full path, {level} process(es): >= {bound} x raw psycopg",
                    f"{ratio:.2f}",
                    ratio >= bound,
                )
            )
    sqlite_full = get(1, "opsrun-full@sqlite")
    if sqlite_full:
        targets.append(
            (
                "SQLite durable full path >= 2,000 jobs/s",
                fmt_rate(sqlite_full.median),
                sqlite_full.median >= 2000,
            )
        )

    # inline
    inline, raw_full, raw_inline = (
        get(1, "opsrun-inline@full"),
        get(1, "raw-full@full"),
        get(1, "raw-inline@full"),
    )
    if inline and raw_full and raw_inline:
        say("\nInline path (run_now: ensure_and_claim -> complete), 1 process, jobs/s\n")
        ratio = paired_ratio(inline, raw_full)
        say(
            table(
                [
                    "opsrun inline",
                    "raw 3 statements",
                    "inline / raw 3",
                    "raw inline",
                    "/ raw inline",
                ],
                [
                    [
                        fmt_rate(inline.median),
                        fmt_rate(raw_full.median),
                        f"{ratio:.2f}",
                        fmt_rate(raw_inline.median),
                        f"{paired_ratio(inline, raw_inline):.2f}",
                    ]
                ],
            )
        )
        targets.append(("inline path >= 1.2 x raw 3-statement path", f"{ratio:.2f}", ratio >= 1.2))

    # dispatch and peer
    rows = []
    for level in sorted(groups):
        for label, suffix in (("0%", ""), ("50%", "-dup")):
            ops = get(level, f"opsrun-dispatch{suffix}@dispatch")
            raw = get(level, f"raw-dispatch{suffix}@dispatch")
            pro = get(level, f"procrastinate-defer{suffix}@dispatch")
            if ops is None or raw is None:
                continue
            rows.append(
                [
                    level,
                    label,
                    fmt_rate(ops.median),
                    fmt_rate(raw.median),
                    f"{paired_ratio(ops, raw):.2f}",
                    fmt_rate(pro.median) if pro else "-",
                    f"{paired_ratio(ops, pro):.2f}" if pro else "-",
                ]
            )
    if rows:
        say("\nDispatch alone, dispatches/s (duplicates: every identity dispatched twice)")
        if peer_version:
            say(
                f"Procrastinate {peer_version}: defer with a queueing_lock per job (same Postgres)\n"
            )
        say(
            table(
                ["procs", "dups", "opsrun", "raw", "opsrun/raw", "procrastinate", "opsrun/procr."],
                rows,
            )
        )
    ops, pro = get(1, "opsrun-dispatch@dispatch"), get(1, "procrastinate-defer@dispatch")
    if ops and pro:
        ratio = paired_ratio(ops, pro)
        targets.append(
            ("dispatch >= 2 x Procrastinate defer (unique lock)", f"{ratio:.2f}", ratio >= 2)
        )

    # scale
    scale_series = sorted(
        (
            (int(spec.rsplit("-", 1)[1]), series)
            for spec, series in groups.get(1, {}).items()
            if spec.startswith("opsrun-full@scale-")
        ),
        key=lambda item: item[0],
    )
    if scale_series:
        empty = scale_series[0][1]
        say(
            "\nScale: full path (1 process) and reconcile with completed runs already in the table\n"
        )
        rows = []
        for rows_loaded, series in scale_series:
            key = f"scale-{rows_loaded}"
            rec = reconciles.get(key)
            rows.append(
                [
                    f"{rows_loaded:,}",
                    fmt_rate(series.median),
                    f"{paired_ratio(series, empty):.2f}",
                    f"{rec.median_ms:.1f}" if rec else "-",
                    rec.candidates if rec else "-",
                    f"{load_seconds.get(key, 0):.0f}",
                ]
            )
        say(
            table(
                [
                    "history",
                    "full path jobs/s",
                    "vs empty",
                    "reconcile ms",
                    "candidates",
                    "load s",
                ],
                rows,
            )
        )
        largest, series = scale_series[-1]
        if largest:
            ratio = paired_ratio(series, empty)
            targets.append(
                (f"full path at {largest:,} runs >= 0.9 x empty", f"{ratio:.2f}", ratio >= 0.9)
            )

    say("\nTargets (issue 8)\n")
    say(
        table(
            ["target", "measured", "met"],
            [[t, m, "n/a" if ok is None else ("yes" if ok else "NO")] for t, m, ok in targets],
        )
    )
    load = machine.get("load average", "n/a")
    say(f"\nload average at start: {load} on {machine.get('nproc')} cores")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
