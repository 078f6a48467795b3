"""A short stress run (the long one is ``python -m tests.stress --seconds 60``, see tests/stress.py).

Bounded by operations per process, never by time; the seed is fixed so a failure can be replayed
(``python -m tests.stress --ops 25 --processes 8 --seed 7 --database-url ...``), although the
interleaving of the processes is not.
"""

from __future__ import annotations

from tests.stress import StressConfig, run_stress

SEED = 7


#: processes per backend: SQLite has one writer at a time, so fewer contend there
PROCESSES = {"sqlite": 4, "postgres": 8}
OPS = 25


def test_a_short_stress_run_keeps_every_invariant(
    opsrun_backend: str, opsrun_database_url: str
) -> None:
    processes = PROCESSES[opsrun_backend]
    config = StressConfig(
        url=opsrun_database_url,
        workspace="stress",
        processes=processes,
        ops=OPS,
        seed=SEED,
        identities=4,
    )
    report = run_stress(config)
    assert report.ok, report.format()
    figures = report.figures
    assert figures["operations"] == processes * OPS
    assert figures["dispatches"] == sum(
        figures[f"  {name}"] for name in ("created", "reused_active", "reused_cooldown")
    )
    assert figures["  created"] == figures["runs in the ledger"] > 0
    assert figures["executions completed"] > 0
    assert figures["executions lease_lost"] == 0
