"""Built-in ``opsrun_summarize`` and ``opsrun_fail``: durable counts and stable failure codes.

Summary counts always hold ``total``, ``processed`` and ``failed`` (``failed`` items are among the
``processed`` ones; ``total`` defaults to ``processed``). Other counts the job kept are stored too.
Outcome: ``failed`` on an exception or when every processed item failed; ``partially_succeeded``
when some failed; ``succeeded`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opsrun_core import (
    FailureEntry,
    InvalidInput,
    OperationSpec,
    Outcome,
    Run,
    Summary,
    hookimpl,
    sanitize_message,
)

__all__ = ["opsrun_fail", "opsrun_summarize"]


@hookimpl(trylast=True)
def opsrun_summarize(
    spec: OperationSpec,
    run: Run,
    counts: Mapping[str, int],
    failures: Sequence[FailureEntry],
    error: BaseException | None,
) -> Summary:
    processed = counts.get("processed", 0)
    failed = counts.get("failed", 0)
    total = counts.get("total", processed)
    if error is not None:
        # a failing run is recorded whatever its counts were: never let bad counts hide the error
        processed = max(processed, failed)
        total = max(total, processed)
    elif failed > processed:
        raise InvalidInput(
            f"counts of {spec.type!r}: failed ({failed}) cannot exceed processed ({processed}); "
            "count a failed item as processed too"
        )
    elif processed > total:
        raise InvalidInput(
            f"counts of {spec.type!r}: processed ({processed}) cannot exceed total ({total})"
        )
    summary = {**counts, "total": total, "processed": processed, "failed": failed}
    if error is not None or (processed > 0 and failed == processed):
        outcome = Outcome.FAILED
    elif failed > 0:
        outcome = Outcome.PARTIALLY_SUCCEEDED
    else:
        outcome = Outcome.SUCCEEDED
    return Summary(counts=summary, outcome=outcome)


@hookimpl(trylast=True)
def opsrun_fail(spec: OperationSpec, run: Run, error: BaseException) -> list[FailureEntry]:
    text = sanitize_message(error)
    name = type(error).__name__
    message = f"{name}: {text}" if text else name
    return [FailureEntry(code=f"{spec.type}.failed", message=message)]
