"""``accumsync plans push``: plan accumulator definitions (seed 000) from YAML or JSON to VBA.

Each plan's records are validated against the seed's fields, hashed, and sent as one batch
(chunks of ``vba_batch_max``) unless VBA already accepted the same content. 207 items are read
by key (plan_ID, accum_Name); a refused record becomes a dead letter with VBA's message.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from models.tables import PlanPush
from models.vba import PlanAccumulator, dumps
from worker.db import session_scope, utcnow
from worker.flush import client
from worker.settings import get_settings
from worker.store import dead_letter
from worker.vba import VbaClient, VbaError


class PlanFileError(ValueError):
    """The plans file cannot be read, or a record breaks the seed's rules."""


@dataclass
class PushReport:
    """One row per plan: (plan id, records, outcome); ``failed`` counts refused records."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    failed: int = 0


def load_plans(path: Path) -> list[PlanAccumulator]:
    """Read and validate every record; the error names the record's index and field."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise PlanFileError(f"{path}: cannot read plans: {exc}") from None
    records = data.get("plans") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise PlanFileError(f"{path}: expected a list of plan accumulators (or {{plans: [...]}})")
    plans = []
    for i, record in enumerate(records):
        try:
            plans.append(PlanAccumulator.model_validate(record))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise PlanFileError(f"{path}: record {i}: {problems}") from None
    return plans


def content_hash(records: list[PlanAccumulator]) -> str:
    body = sorted(dumps(r.to_wire()) for r in records)
    return hashlib.sha256("\n".join(body).encode()).hexdigest()


def push_plans(
    plans: list[PlanAccumulator], force: bool = False, vba: VbaClient | None = None
) -> PushReport:
    """Send each changed plan's records; unchanged plans are skipped unless ``force``."""
    by_plan: dict[str, list[PlanAccumulator]] = defaultdict(list)
    for plan in plans:
        by_plan[plan.plan_ID].append(plan)
    report = PushReport()
    for plan_id, records in sorted(by_plan.items()):
        digest = content_hash(records)
        with session_scope() as s:
            known = s.get(PlanPush, plan_id)
        if known is not None and known.content_hash == digest and not force:
            report.rows.append((plan_id, str(len(records)), "unchanged, skipped"))
            continue
        failed = _push_one(vba or client(), plan_id, records)
        report.failed += failed
        if not failed:
            with session_scope() as s:
                s.merge(PlanPush(plan_id=plan_id, content_hash=digest, pushed_at=utcnow()))
        outcome = "sent" if not failed else f"{failed} refused"
        report.rows.append((plan_id, str(len(records)), outcome))
    return report


def _push_one(vba: VbaClient, plan_id: str, records: list[PlanAccumulator]) -> int:
    """Send one plan in chunks; returns how many records were not accepted."""
    size, failed = get_settings().vba_batch_max, 0
    for start in range(0, len(records), size):
        chunk = records[start : start + size]
        try:
            result = vba.upsert_plan_accumulators(plan_id, chunk)
        except VbaError as exc:
            _refused(chunk, f"VBA call failed: {exc}", exc.activity_id)
            failed += len(chunk)
            continue
        for record in chunk:
            item = result.find(record.key)
            if item is None or not item.ok:
                why = f"VBA refused ({item.status}): {item.body}" if item else "no 207 item for key"
                _refused([record], why, result.activity_id)
                failed += 1
    return failed


def _refused(records: list[PlanAccumulator], reason: str, activity_id: str | None) -> None:
    now = utcnow()
    with session_scope() as s:
        for record in records:
            payload: Any = json.loads(dumps(record.to_wire()))
            dead_letter(s, "plans", payload, reason, now, activity_id=activity_id)
