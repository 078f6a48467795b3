"""The plugin system: entry points, overrides of every first-result hook, block list, validation."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from opsrun_core import (
    ClaimDecision,
    DispatchRejected,
    FailureEntry,
    Identity,
    Ledger,
    OperationSpec,
    Outcome,
    PluginError,
    Summary,
    get_plugin_manager,
    hookimpl,
)
from opsrun_core import hookspecs as specs_module

HOOKS = sorted(name for name in dir(specs_module) if name.startswith("opsrun_"))
FETCH = "assignments.fetch"


def test_the_built_ins_come_from_the_entry_point_group() -> None:
    pm = get_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"identity", "dedupe", "tracking"} <= names
    for hook in ("opsrun_identity", "opsrun_claim", "opsrun_summarize", "opsrun_fail"):
        impls = getattr(pm.hook, hook).get_hookimpls()
        assert impls and all(impl.trylast for impl in impls if impl.plugin_name in names)


def test_a_plugin_distribution_is_found_through_the_entry_point_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "opsrun_example_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from datetime import timedelta
            from opsrun_core import OperationSpec, hookimpl

            @hookimpl
            def opsrun_register_operations():
                return [OperationSpec("example.sync", label="Example sync",
                                      cooldown=timedelta(minutes=5))]
            """
        )
    )
    dist = tmp_path / "opsrun_example_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: opsrun-example-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text("[opsrun]\nexample = opsrun_example_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager()
    assert pm.get_plugin("example") is not None
    ledger = Ledger("sqlite://", plugin_manager=pm)
    assert ledger.catalog.label("example.sync") == "Example sync"
    assert ledger.catalog.spec("example.sync").cooldown == timedelta(minutes=5)
    monkeypatch.setenv("OPSRUN_DISABLE_PLUGINS", "example")
    assert get_plugin_manager().get_plugin("example") is None


def test_the_block_list_removes_a_built_in(monkeypatch: pytest.MonkeyPatch, opsrun_engine) -> None:
    monkeypatch.setenv("OPSRUN_DISABLE_PLUGINS", " dedupe ,nothing")
    pm = get_plugin_manager()
    assert pm.get_plugin("dedupe") is None and pm.get_plugin("tracking") is not None
    assert not pm.hook.opsrun_claim.get_hookimpls()
    ledger = Ledger(opsrun_engine, plugin_manager=pm)
    with pytest.raises(PluginError, match="dedupe"):
        ledger.ensure_run(FETCH, workspace_id="w1", identity={})


def test_a_misspelled_hook_is_an_error() -> None:
    class Typo:
        @hookimpl
        def opsrun_clam(self, spec, identity, active, latest_completed, now):
            return None

    with pytest.raises(PluginError, match="opsrun_clam"):
        get_plugin_manager(plugins=[Typo()])


def test_an_unknown_argument_is_an_error() -> None:
    class Wrong:
        @hookimpl
        def opsrun_fail(self, spec, run, error, extra):
            return None

    with pytest.raises(PluginError):
        get_plugin_manager(plugins=[Wrong()])


def test_a_host_identity_plugin_wins(opsrun_ledger: Ledger) -> None:
    class Identities:
        @hookimpl
        def opsrun_identity(self, spec, workspace_id, tenant_id, inputs):
            if spec.type != FETCH:
                return None
            return Identity(hash="f" * 64, inputs={"custom": True})

    plugin = Identities()
    opsrun_ledger.pm.register(plugin)
    try:
        a = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"})
        b = opsrun_ledger.ensure_run(FETCH, workspace_id="w2", identity={"policy_id": "p2"})
        c = opsrun_ledger.ensure_run("other.type", workspace_id="w1", identity={"policy_id": "p1"})
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert a.run.identity_hash == "f" * 64 and a.run.identity == {"custom": True}
    assert b.run.id == a.run.id  # the host said these are one identity
    assert c.run.identity_hash != "f" * 64  # no opinion: the built-in answered


def test_a_host_claim_plugin_wins_and_can_reject(opsrun_ledger: Ledger) -> None:
    seen: list = []

    class OnePerWorkspace:
        @hookimpl
        def opsrun_claim(self, spec, identity, active, latest_completed, now):
            seen.append((active, latest_completed))
            if identity.inputs.get("policy_id") == "forbidden":
                return ClaimDecision("reject", reason="policy is locked by an admin")
            return None

    plugin = OnePerWorkspace()
    opsrun_ledger.pm.register(plugin)
    try:
        with pytest.raises(DispatchRejected, match="locked by an admin"):
            opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "forbidden"})
        ok = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"})
        again = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"policy_id": "p1"})
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert ok.created and again.run.id == ok.run.id and not again.created
    assert seen[0] == (None, None) and seen[-1][0].id == ok.run.id
    assert [r.id for r in opsrun_ledger.runs(type=FETCH)] == [ok.run.id]


def test_a_host_claim_plugin_can_turn_a_cooldown_off(opsrun_ledger: Ledger, opsrun_clock) -> None:
    opsrun_ledger.catalog.register(OperationSpec(FETCH, cooldown=timedelta(minutes=15)))
    done = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={})
    opsrun_ledger.complete(opsrun_ledger.claim(done.run.id), {"total": 1, "processed": 1})

    class ForceRefresh:
        @hookimpl
        def opsrun_claim(self, spec, identity, active, latest_completed, now):
            return None if active else ClaimDecision("create")

    plugin = ForceRefresh()
    opsrun_ledger.pm.register(plugin)
    try:
        fresh = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={})
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert fresh.created and fresh.run.id != done.run.id


def test_a_host_summarize_plugin_wins(opsrun_ledger: Ledger) -> None:
    class Strict:
        @hookimpl
        def opsrun_summarize(self, spec, run, counts, failures, error):
            total = counts.get("total", 0)
            outcome = Outcome.FAILED if counts.get("failed", 0) else Outcome.SUCCEEDED
            return Summary(
                counts={
                    "total": total,
                    "processed": total,
                    "failed": counts.get("failed", 0),
                    "strict": 1,
                },
                outcome=outcome,
            )

    plugin = Strict()
    opsrun_ledger.pm.register(plugin)
    try:
        run = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={}).run
        done = opsrun_ledger.complete(
            opsrun_ledger.claim(run.id), {"total": 5, "processed": 5, "failed": 1}
        )
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert done.outcome is Outcome.FAILED  # the built-in would have said partially_succeeded
    assert done.summary_counts == {"total": 5, "processed": 5, "failed": 1, "strict": 1}


def test_a_host_fail_plugin_wins_and_is_still_sanitized(opsrun_ledger: Ledger) -> None:
    class Codes:
        @hookimpl
        def opsrun_fail(self, spec, run, error):
            if isinstance(error, TimeoutError):
                return [
                    FailureEntry(
                        "directory.timeout", f"timed out with api_key=SECRETVALUE123 {error}"
                    )
                ]
            return None

    plugin = Codes()
    opsrun_ledger.pm.register(plugin)
    try:
        a = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"n": 1}).run
        failed = opsrun_ledger.fail(opsrun_ledger.claim(a.id), TimeoutError("read"))
        b = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={"n": 2}).run
        other = opsrun_ledger.fail(opsrun_ledger.claim(b.id), ValueError("bad"))
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert failed.failure_summary == [
        {"code": "directory.timeout", "message": "timed out with api_key=[REDACTED] read"}
    ]
    assert other.failure_summary[0]["code"] == f"{FETCH}.failed"


def test_register_operations_adds_to_the_catalog_and_conflicts_are_errors(opsrun_engine) -> None:
    class Ops:
        @hookimpl
        def opsrun_register_operations(self):
            return [OperationSpec("restore.run", label="Restore", cooldown=timedelta(minutes=1))]

    class Clash:
        @hookimpl
        def opsrun_register_operations(self):
            return [OperationSpec("restore.run", label="Something else")]

    ledger = Ledger(opsrun_engine, plugin_manager=get_plugin_manager(plugins=[Ops()]))
    assert ledger.catalog.label("restore.run") == "Restore"
    with pytest.raises(Exception, match="already registered"):
        Ledger(opsrun_engine, plugin_manager=get_plugin_manager(plugins=[Ops(), Clash()]))


def test_run_finished_observes_terminal_writes_and_wrappers_time_hooks(
    opsrun_ledger: Ledger,
) -> None:
    finished: list = []
    wrapped: list = []

    class Observer:
        @hookimpl
        def opsrun_run_finished(self, run):
            finished.append((run.id, run.outcome))

        @hookimpl(wrapper=True)
        def opsrun_summarize(self, spec, run, counts, failures, error):
            result = yield
            wrapped.append(result.outcome)
            return result

    plugin = Observer()
    opsrun_ledger.pm.register(plugin)
    try:
        run = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={}).run
        opsrun_ledger.complete(opsrun_ledger.claim(run.id), {"total": 2, "processed": 2})
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert finished == [(run.id, Outcome.SUCCEEDED)]
    assert wrapped == [Outcome.SUCCEEDED]


def test_every_hook_has_a_test() -> None:
    """datasette's meta-test: a hook nobody tests is a hook nobody knows works."""
    sources = "".join(
        p.read_text()
        for p in Path(__file__).parents[1].rglob("test_*.py")
        if p.name != "test_plugins.py"
    )
    sources += Path(__file__).read_text().split("def test_every_hook_has_a_test")[0]
    untested = [hook for hook in HOOKS if f"def {hook}(" not in sources]
    assert untested == []


def test_every_hook_is_documented_with_its_signature() -> None:
    import inspect

    doc = (Path(__file__).parents[2] / "docs" / "hooks.md").read_text()
    for hook in HOOKS:
        signature = f"{hook}{inspect.signature(getattr(specs_module, hook))}"
        assert signature.replace("'", "") in doc, f"docs/hooks.md lacks `{signature}`"


def test_a_raising_fail_plugin_cannot_keep_a_failure_from_being_recorded(
    opsrun_ledger: Ledger,
) -> None:
    class Broken:
        @hookimpl
        def opsrun_fail(self, spec, run, error):
            raise KeyError("plugin bug")

    plugin = Broken()
    opsrun_ledger.pm.register(plugin)
    try:
        run = opsrun_ledger.ensure_run(FETCH, workspace_id="w1", identity={}).run
        failed = opsrun_ledger.fail(opsrun_ledger.claim(run.id), RuntimeError("boom"))
    finally:
        opsrun_ledger.pm.unregister(plugin)
    assert failed.outcome is Outcome.FAILED
    assert failed.failure_summary == [{"code": f"{FETCH}.failed", "message": "RuntimeError"}]
