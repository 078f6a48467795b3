"""The directory adapter: the remote device-management API the assignment jobs talk to.

:class:`DirectoryAdapter` is the interface the jobs use; :class:`FakeDirectory` is a deterministic
stand-in for it, good enough to show every path the jobs have to handle:

* per-policy data: each policy's assignments are generated from ``(seed, policy external id)``, so
  the same policy always lists the same assignments, in every process;
* injectable latency (seconds per call, or a callable returning them) and a test hook called before
  every call (``on_call``);
* throttling, HTTP 429 style: :meth:`FakeDirectory.throttle` makes calls for a policy fail with
  :class:`DirectoryThrottled` (once, a few times or for good, optionally after some calls succeed),
  whose message carries the bearer token of the request and the app's ``client_secret``, as careless
  client libraries do. None of that may ever reach the ledger;
* partial failures: some assignments cannot be read (:meth:`FakeDirectory.corrupt`, or a rate) and
  some restores target a group that no longer exists (:meth:`FakeDirectory.delete_group`, or a
  rate); each raises :class:`DirectoryItemError` for that one item only.

Tokens come from :meth:`DirectoryAdapter.acquire_token` and are checked on every call, so a job that
is not handed its ``access_token`` cannot work.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "AssignmentTarget",
    "DirectoryAdapter",
    "DirectoryAuthError",
    "DirectoryCall",
    "DirectoryError",
    "DirectoryItemError",
    "DirectoryThrottled",
    "FakeDirectory",
    "RemoteAssignment",
]

#: what kinds of target an assignment can have
TARGET_KINDS = ("group", "all_devices", "all_users")


@dataclass(frozen=True)
class AssignmentTarget:
    """What an assignment points at: a group (``target_id``) or everyone, included or excluded."""

    target_kind: str
    target_id: str | None
    intent: str = "include"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssignmentTarget:
        """Read a backup item (``{"target_kind", "target_id", "intent"}``)."""
        return cls(
            target_kind=str(data["target_kind"]),
            target_id=None if data.get("target_id") is None else str(data["target_id"]),
            intent=str(data.get("intent", "include")),
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored in a backup."""
        return {"target_kind": self.target_kind, "target_id": self.target_id, "intent": self.intent}


@dataclass(frozen=True)
class RemoteAssignment:
    """An assignment as the directory returns it."""

    id: str
    target: AssignmentTarget


@dataclass(frozen=True)
class DirectoryCall:
    """One call made to the directory (what :attr:`FakeDirectory.on_call` receives)."""

    operation: str
    tenant: uuid.UUID
    policy: uuid.UUID


class DirectoryError(Exception):
    """Base of the directory's errors; ``code`` is the stable failure code the jobs record."""

    code = "directory.error"


class DirectoryAuthError(DirectoryError):
    """HTTP 401: the call came without a valid access token."""

    code = "directory.unauthorized"


class DirectoryThrottled(DirectoryError):
    """HTTP 429: the directory asks the caller to back off for ``retry_after`` seconds."""

    code = "directory.throttled"
    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DirectoryItemError(DirectoryError):
    """One assignment failed (the rest of the call's items are unaffected)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DirectoryAdapter(Protocol):
    """What the assignment jobs need from the remote device-management API."""

    def acquire_token(self, tenant: uuid.UUID) -> str:
        """An access token for the tenant (client-credentials flow). Never store it."""
        ...

    def list_assignments(
        self, *, tenant: uuid.UUID, policy: uuid.UUID, access_token: str
    ) -> list[str]:
        """The ids of the policy's assignments. :raises DirectoryThrottled: back off."""
        ...

    def read_assignment(
        self, *, tenant: uuid.UUID, policy: uuid.UUID, assignment_id: str, access_token: str
    ) -> RemoteAssignment:
        """One assignment. :raises DirectoryItemError: this one cannot be read."""
        ...

    def apply_assignment(
        self,
        *,
        tenant: uuid.UUID,
        policy: uuid.UUID,
        target: AssignmentTarget,
        access_token: str,
    ) -> RemoteAssignment:
        """Assign the policy to ``target`` (idempotent). :raises DirectoryItemError: refused."""
        ...


@dataclass
class _Throttle:
    after: int
    times: int | None
    operation: str | None


class FakeDirectory:
    """A deterministic, thread-safe in-memory directory (see the module docstring).

    :param seed: seeds every policy's data together with the policy's external id.
    :param latency: seconds each call takes, or a zero-argument callable returning them.
    :param sleep: how latency is spent (tests pass a no-op).
    :param item_failure_rate: share of assignments that cannot be read, chosen from their ids.
    :param missing_group_rate: share of groups that no longer exist, chosen from their ids.
    :param client_secret: the app's credential; generated when not given.
    :param on_call: called with a :class:`DirectoryCall` before each call does anything.
    """

    base_url = "https://directory.fake.test/v1"
    client_id = "3f1c2a9e-reference-app"

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float | Callable[[], float] = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        item_failure_rate: float = 0.0,
        missing_group_rate: float = 0.0,
        client_secret: str | None = None,
        on_call: Callable[[DirectoryCall], None] | None = None,
    ) -> None:
        for name, rate in (
            ("item_failure_rate", item_failure_rate),
            ("missing_group_rate", missing_group_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        self.seed = seed
        self.latency = latency
        self.sleep = sleep
        self.item_failure_rate = item_failure_rate
        self.missing_group_rate = missing_group_rate
        self.client_secret = client_secret or "cs~" + secrets.token_urlsafe(24)
        self.on_call = on_call
        self._lock = threading.Lock()
        self._tokens: dict[str, uuid.UUID] = {}
        self._throttles: dict[uuid.UUID, _Throttle] = {}
        self._corrupt: dict[uuid.UUID, int] = {}
        self._deleted_groups: set[str] = set()
        #: calls made, by ``(operation, policy)``
        self.calls: Counter[tuple[str, uuid.UUID]] = Counter()
        #: calls answered with HTTP 429, by policy
        self.throttled: Counter[uuid.UUID] = Counter()

    # -- fault injection ---------------------------------------------------------------------------

    def throttle(
        self,
        policy: uuid.UUID,
        *,
        times: int | None = 1,
        after: int = 0,
        operation: str | None = None,
    ) -> None:
        """Answer calls for ``policy`` with HTTP 429: the ``times`` calls that follow the next
        ``after`` successful ones (``times=None``: every one of them, for good).

        ``operation`` (``"list_assignments"``, ``"read_assignment"``, ``"apply_assignment"``)
        limits the throttling, and the counting, to calls of that operation.
        """
        if times is not None and times < 1:
            raise ValueError("times must be a positive int or None")
        if after < 0:
            raise ValueError("after must be >= 0")
        with self._lock:
            self._throttles[policy] = _Throttle(after=after, times=times, operation=operation)

    def corrupt(self, policy: uuid.UUID, count: int) -> None:
        """Make the first ``count`` assignments of ``policy`` unreadable."""
        with self._lock:
            self._corrupt[policy] = count

    def delete_group(self, group_id: str) -> None:
        """The group is gone: restoring an assignment to it fails for that item."""
        with self._lock:
            self._deleted_groups.add(str(group_id))

    @property
    def issued_tokens(self) -> list[str]:
        """Every access token handed out so far (for tests that look for leaks)."""
        with self._lock:
            return list(self._tokens)

    # -- the adapter -------------------------------------------------------------------------------

    def acquire_token(self, tenant: uuid.UUID) -> str:
        """A JWT-shaped bearer token for ``tenant``, valid for this directory only."""

        def part(data: dict[str, Any]) -> str:
            raw = json.dumps(data, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        token = ".".join(
            (
                part({"alg": "HS256", "typ": "JWT"}),
                part({"tid": str(tenant), "jti": secrets.token_hex(8)}),
                secrets.token_urlsafe(32),
            )
        )
        with self._lock:
            self._tokens[token] = tenant
        return token

    def assignments_of(self, policy: uuid.UUID) -> list[RemoteAssignment]:
        """The policy's assignments, generated from ``(seed, policy)`` (no call is counted)."""
        rng = random.Random(f"{self.seed}:{policy}")
        items = []
        for _ in range(rng.randint(3, 7)):
            assignment_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            roll = rng.random()
            if roll < 0.7:
                group = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                intent = "exclude" if rng.random() < 0.2 else "include"
                target = AssignmentTarget("group", group, intent)
            else:
                target = AssignmentTarget("all_devices" if roll < 0.85 else "all_users", None)
            items.append(RemoteAssignment(assignment_id, target))
        return items

    def list_assignments(
        self, *, tenant: uuid.UUID, policy: uuid.UUID, access_token: str
    ) -> list[str]:
        """The ids of the policy's assignments."""
        self._call("list_assignments", tenant, policy, access_token)
        return [a.id for a in self.assignments_of(policy)]

    def read_assignment(
        self, *, tenant: uuid.UUID, policy: uuid.UUID, assignment_id: str, access_token: str
    ) -> RemoteAssignment:
        """One assignment, or :class:`DirectoryItemError` for a corrupt one."""
        self._call("read_assignment", tenant, policy, access_token)
        items = self.assignments_of(policy)
        with self._lock:
            corrupt = self._corrupt.get(policy, 0)
        broken = {a.id for a in items[:corrupt]}
        for item in items:
            if item.id != assignment_id:
                continue
            if item.id in broken or self._roll("item", item.id) < self.item_failure_rate:
                raise DirectoryItemError(
                    "directory.assignment_unreadable",
                    f"HTTP 502 reading assignment {item.id} of policy {policy}: malformed payload "
                    f"from upstream (request Authorization: Bearer {access_token})",
                )
            return item
        raise DirectoryItemError(
            "directory.assignment_not_found",
            f"HTTP 404 assignment {assignment_id} of policy {policy} not found",
        )

    def apply_assignment(
        self,
        *,
        tenant: uuid.UUID,
        policy: uuid.UUID,
        target: AssignmentTarget,
        access_token: str,
    ) -> RemoteAssignment:
        """Assign ``policy`` to ``target``; a deleted group fails for this item only."""
        self._call("apply_assignment", tenant, policy, access_token)
        if target.target_kind not in TARGET_KINDS:
            raise DirectoryItemError(
                "directory.invalid_target", f"HTTP 400 unknown target kind {target.target_kind!r}"
            )
        if target.target_id is not None:
            with self._lock:
                deleted = target.target_id in self._deleted_groups
            if deleted or self._roll("group", target.target_id) < self.missing_group_rate:
                raise DirectoryItemError(
                    "directory.target_not_found",
                    f"HTTP 404 assigning policy {policy}: target group {target.target_id} no "
                    f"longer exists (request Authorization: Bearer {access_token})",
                )
        key = f"{policy}:{target.target_kind}:{target.target_id}:{target.intent}"
        return RemoteAssignment(str(uuid.uuid5(uuid.NAMESPACE_URL, key)), target)

    # -- plumbing ----------------------------------------------------------------------------------

    def _roll(self, kind: str, item: str) -> float:
        return random.Random(f"{self.seed}:{kind}:{item}").random()

    def _call(self, operation: str, tenant: uuid.UUID, policy: uuid.UUID, token: str) -> None:
        if self.on_call is not None:
            self.on_call(DirectoryCall(operation, tenant, policy))
        delay = self.latency() if callable(self.latency) else self.latency
        if delay > 0:
            self.sleep(delay)
        with self._lock:
            self.calls[(operation, policy)] += 1
            if self._tokens.get(token) != tenant:
                raise DirectoryAuthError(
                    f"HTTP 401 {operation} for tenant {tenant}: invalid or missing access token"
                )
            plan = self._throttles.get(policy)
            if plan is None or plan.operation not in (None, operation):
                return
            if plan.after > 0:
                plan.after -= 1
                return
            if plan.times is not None:
                plan.times -= 1
                if plan.times == 0:
                    del self._throttles[policy]
            self.throttled[policy] += 1
        raise DirectoryThrottled(
            f"HTTP 429 Too Many Requests from {self.base_url}/tenants/{tenant}/policies/{policy}"
            f"/assignments ({operation}): throttled, retry after 2 s. Request: Authorization: "
            f"Bearer {token}; app credentials client_id={self.client_id} "
            f"client_secret={self.client_secret}",
            retry_after=2.0,
        )
