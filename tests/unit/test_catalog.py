"""The operation catalog: labels, fallbacks, settings and their validation."""

from __future__ import annotations

from datetime import timedelta

import pytest

from opsrun_core import (
    RECONCILE_TYPE,
    InvalidInput,
    OperationCatalog,
    OperationSpec,
    fallback_label,
)


def test_reconcile_is_built_in_with_its_label_and_duration() -> None:
    catalog = OperationCatalog()
    assert catalog.label(RECONCILE_TYPE) == "Reconcile adapter runs"
    assert catalog.expected_duration(RECONCILE_TYPE) == timedelta(minutes=2)
    assert RECONCILE_TYPE in catalog


@pytest.mark.parametrize(
    ("type_", "label"),
    [
        ("assignments.fetch", "Assignments fetch"),
        ("assignments.restore", "Assignments restore"),
        ("ops.reconcile-adapter_runs", "Ops reconcile adapter runs"),
        ("sync", "Sync"),
        ("a:b", "A b"),
    ],
)
def test_unknown_types_get_a_readable_label(type_: str, label: str) -> None:
    assert OperationCatalog().label(type_) == label == fallback_label(type_)


def test_registered_labels_win_and_settings_are_kept() -> None:
    catalog = OperationCatalog()
    spec = catalog.register(
        OperationSpec(
            "assignments.fetch", label="Fetch assignments", cooldown=timedelta(minutes=15)
        )
    )
    assert catalog.label("assignments.fetch") == "Fetch assignments"
    assert catalog.spec("assignments.fetch") is spec
    assert catalog.spec("unknown.type").cooldown is None


def test_conflicting_registration_is_an_error_unless_replacing() -> None:
    catalog = OperationCatalog([OperationSpec("a.b", cooldown=timedelta(minutes=1))])
    catalog.register(OperationSpec("a.b", cooldown=timedelta(minutes=1)))  # the same: fine
    with pytest.raises(InvalidInput, match="already registered"):
        catalog.register(OperationSpec("a.b", cooldown=timedelta(minutes=2)))
    catalog.register(OperationSpec("a.b", cooldown=timedelta(minutes=2)), replace=True)
    assert catalog.spec("a.b").cooldown == timedelta(minutes=2)


def test_define_updates_fields_and_refuses_unknown_ones() -> None:
    catalog = OperationCatalog()
    catalog.define("a.b", label="A")
    catalog.define("a.b", cooldown=timedelta(minutes=3))
    assert catalog.spec("a.b").label == "A" and catalog.spec("a.b").cooldown == timedelta(minutes=3)
    with pytest.raises(InvalidInput, match="cooldwn"):
        catalog.define("a.b", cooldwn=timedelta(minutes=3))


def test_lease_and_queued_limit_defaults_derive_from_the_expected_duration() -> None:
    spec = OperationSpec("a.b", expected_duration=timedelta(minutes=10))
    assert spec.lease_duration == timedelta(minutes=20)
    assert spec.queued_timeout == timedelta(hours=1)
    assert OperationSpec("a.b", expected_duration=timedelta(seconds=1)).lease_duration == timedelta(
        seconds=30
    )
    assert OperationSpec("a.b", lease=timedelta(seconds=5)).lease_duration == timedelta(seconds=5)
    assert OperationSpec("a.b", expected_duration=timedelta(hours=3)).queued_timeout == timedelta(
        hours=6
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": ""},
        {"type": "has space"},
        {"type": "x" * 201},
        {"type": "a.b", "cooldown": timedelta(0)},
        {"type": "a.b", "lease": timedelta(seconds=-1)},
        {"type": "a.b", "expected_duration": None},
        {"type": "a.b", "queued_limit": 5},
        {"type": "a.b", "label": "  "},
    ],
)
def test_bad_specs_are_refused(kwargs) -> None:
    with pytest.raises(InvalidInput):
        OperationSpec(**kwargs)
