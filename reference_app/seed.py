"""The seeder: ``python -m reference_app seed [--fresh]``.

With ``fresh`` it is ``migrate:fresh --seed``: every table is dropped and recreated (the ledger's
through opsrun's migrations), then seeded. Without it the schema is brought up to date and whatever
is missing is added, so running it again changes nothing. Either way, running it twice works.

What it seeds, every row with its ``workspace_id`` set (so no NOT NULL constraint can fail):

* the default workspace;
* the platform tenant, in the default workspace;
* demo tenants, each with policies, and a backup of each policy's assignments.

Tenant and policy ``external_id`` values are fresh UUID v4s. They are never taken from the
``INTUNE_TENANT_ID`` environment variable (a real tenant's id, which a developer may have set), and
never collide with it: a generated value equal to it, or to an existing one, is drawn again.
"""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .models import AssignmentBackup, Policy, Tenant, Workspace
from .schema import ensure_schema, reset_schema

__all__ = [
    "DEFAULT_WORKSPACE_SLUG",
    "DEMO_TENANTS",
    "INTUNE_TENANT_ID_ENV",
    "PLATFORM_TENANT_SLUG",
    "SeedReport",
    "seed",
]

DEFAULT_WORKSPACE_SLUG = "default"
PLATFORM_TENANT_SLUG = "platform"
#: a real tenant id a developer may have in their environment: never used by the seed
INTUNE_TENANT_ID_ENV = "INTUNE_TENANT_ID"
#: slug and name of each demo tenant
DEMO_TENANTS = (
    ("contoso", "Contoso Ltd"),
    ("fabrikam", "Fabrikam Inc"),
    ("northwind", "Northwind Traders"),
)
#: name and platform of each demo tenant's policies
DEMO_POLICIES = (
    ("Windows baseline", "windows"),
    ("iOS restrictions", "ios"),
    ("Android work profile", "android"),
)
#: the platform tenant's own policy
PLATFORM_POLICIES = (("Admin workstations", "windows"),)


@dataclass(frozen=True)
class SeedReport:
    """What the database holds after seeding, and how many rows this run added."""

    workspace_id: int
    platform_tenant_id: int
    tenants: int
    policies: int
    backups: int
    added: int
    fresh: bool


class _Seeder:
    def __init__(self, session: Session, rng: random.Random) -> None:
        self.session = session
        self.rng = rng
        self.added = 0
        self.taken = set(session.scalars(select(Tenant.external_id)))
        self.taken.update(session.scalars(select(Policy.external_id)))
        env = os.environ.get(INTUNE_TENANT_ID_ENV, "").strip()
        with contextlib.suppress(ValueError):  # unset or not a UUID: nothing to collide with
            self.taken.add(uuid.UUID(env))

    def external_id(self) -> uuid.UUID:
        """A fresh UUID v4 that is neither taken nor ``$INTUNE_TENANT_ID``."""
        while True:
            value = uuid.UUID(int=self.rng.getrandbits(128), version=4)
            if value not in self.taken:
                self.taken.add(value)
                return value

    def workspace(self) -> Workspace:
        found = self.session.scalar(
            select(Workspace).where(Workspace.slug == DEFAULT_WORKSPACE_SLUG)
        )
        if found is None:
            found = Workspace(slug=DEFAULT_WORKSPACE_SLUG, name="Default workspace")
            self._add(found)
        return found

    def tenant(self, workspace: Workspace, slug: str, name: str, *, platform: bool) -> Tenant:
        found = self.session.scalar(
            select(Tenant).where(Tenant.workspace_id == workspace.id, Tenant.slug == slug)
        )
        if found is None:
            found = Tenant(
                workspace_id=workspace.id,
                slug=slug,
                name=name,
                external_id=self.external_id(),
                is_platform=platform,
            )
            self._add(found)
        return found

    def policy(self, tenant: Tenant, name: str, platform: str) -> Policy:
        found = self.session.scalar(
            select(Policy).where(Policy.tenant_id == tenant.id, Policy.name == name)
        )
        if found is None:
            found = Policy(
                workspace_id=tenant.workspace_id,
                tenant_id=tenant.id,
                external_id=self.external_id(),
                name=name,
                platform=platform,
            )
            self._add(found)
        return found

    def backup(self, policy: Policy) -> AssignmentBackup:
        found = self.session.scalar(
            select(AssignmentBackup).where(AssignmentBackup.policy_id == policy.id)
        )
        if found is None:
            items: list[dict[str, Any]] = []
            for index in range(self.rng.randint(3, 6)):
                group = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
                intent = "exclude" if index == 0 and self.rng.random() < 0.3 else "include"
                items.append({"target_kind": "group", "target_id": group, "intent": intent})
            items.append({"target_kind": "all_devices", "target_id": None, "intent": "include"})
            found = AssignmentBackup(
                workspace_id=policy.workspace_id,
                policy_id=policy.id,
                label=f"Nightly backup of {policy.name}",
                items=items,
            )
            self._add(found)
        return found

    def _add(self, row: object) -> None:
        self.session.add(row)
        self.session.flush()
        self.added += 1


def seed(engine: Engine, *, fresh: bool = False, rng: random.Random | None = None) -> SeedReport:
    """Seed the database (see the module docstring); ``fresh`` drops every table first.

    :param rng: where UUIDs and backup contents come from (default: the OS's randomness).
    """
    if fresh:
        reset_schema(engine)
    else:
        ensure_schema(engine)
    with Session(engine) as session, session.begin():
        seeder = _Seeder(session, rng if rng is not None else random.SystemRandom())
        workspace = seeder.workspace()
        platform = seeder.tenant(workspace, PLATFORM_TENANT_SLUG, "Platform", platform=True)
        for name, kind in PLATFORM_POLICIES:
            seeder.backup(seeder.policy(platform, name, kind))
        for slug, tenant_name in DEMO_TENANTS:
            tenant = seeder.tenant(workspace, slug, tenant_name, platform=False)
            for name, kind in DEMO_POLICIES:
                seeder.backup(seeder.policy(tenant, name, kind))

        def count(model: type[object]) -> int:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

        return SeedReport(
            workspace_id=workspace.id,
            platform_tenant_id=platform.id,
            tenants=count(Tenant),
            policies=count(Policy),
            backups=count(AssignmentBackup),
            added=seeder.added,
            fresh=fresh,
        )
