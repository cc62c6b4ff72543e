"""ledger: events, claims, pairs, accumulators, dead letters

Revision ID: 0001
Revises:
Create Date: 2026-11-22 01:46:53.937848
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "claim",
        sa.Column("claim_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("subscriber_id", sqlmodel.sql.sqltypes.AutoString(length=9), nullable=True),
        sa.Column("group_id", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True),
        sa.Column("plan_year", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("plan_type", sqlmodel.sql.sqltypes.AutoString(length=6), nullable=True),
        sa.Column("benefit_code", sqlmodel.sql.sqltypes.AutoString(length=10), nullable=True),
        sa.Column("network", sqlmodel.sql.sqltypes.AutoString(length=3), nullable=True),
        sa.Column("member_seq", sqlmodel.sql.sqltypes.AutoString(length=2), nullable=True),
        sa.Column("service_date", sa.Date(), nullable=True),
        sa.Column("adjudicated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("allowed_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("benefit_used_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("billed_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cob_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("coinsurance_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("copay_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_credit_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("not_covered_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("out_of_pocket_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("claim_id"),
    )
    op.create_table(
        "dead_letter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("fingerprint", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("accumulator_id", sa.Integer(), nullable=True),
        sa.Column("activity_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("first_seen", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("last_seen", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("replayed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fingerprint"),
    )
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dead_letter_accumulator_id"), ["accumulator_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_dead_letter_event_id"), ["event_id"], unique=False)

    op.create_table(
        "ingest_batch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("applied", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("stale", sa.Integer(), nullable=False),
        sa.Column("conflicts", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.Integer(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ingest_batch", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ingest_batch_at"), ["at"], unique=False)

    op.create_table(
        "pair",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sqlmodel.sql.sqltypes.AutoString(length=9), nullable=False),
        sa.Column("group_id", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("next_attempt_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("lease_until", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("subscriber_id", "group_id", name="uq_pair"),
    )
    with op.batch_alter_table("pair", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_pair_next_attempt_at"), ["next_attempt_at"], unique=False
        )

    op.create_table(
        "received_event",
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("claim_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("received_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    with op.batch_alter_table("received_event", schema=None) as batch_op:
        batch_op.create_index(
            "ix_received_event_claim_version", ["claim_id", "version"], unique=False
        )

    op.create_table(
        "accumulator",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sqlmodel.sql.sqltypes.AutoString(length=9), nullable=False),
        sa.Column("group_id", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("plan_year", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("plan_type", sqlmodel.sql.sqltypes.AutoString(length=6), nullable=False),
        sa.Column("benefit_code", sqlmodel.sql.sqltypes.AutoString(length=10), nullable=False),
        sa.Column("change_seq", sa.BigInteger(), nullable=False),
        sa.Column("pushed_seq", sa.BigInteger(), nullable=False),
        sa.Column("dirty_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("allowed_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("allowed_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("allowed_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("benefit_used_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("benefit_used_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("benefit_used_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("billed_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("billed_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("billed_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cob_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cob_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cob_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("coinsurance_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("coinsurance_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("coinsurance_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("copay_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("copay_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("copay_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_credit_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_credit_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_credit_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("deductible_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("not_covered_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("not_covered_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("not_covered_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("out_of_pocket_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("out_of_pocket_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("out_of_pocket_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_allowed_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_allowed_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_allowed_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_benefit_used_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_benefit_used_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_benefit_used_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_billed_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_billed_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_billed_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_cob_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_cob_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_cob_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_coinsurance_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_coinsurance_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_coinsurance_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_copay_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_copay_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_copay_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "pushed_deductible_credit_total", sa.BigInteger(), server_default="0", nullable=False
        ),
        sa.Column(
            "pushed_deductible_credit_in", sa.BigInteger(), server_default="0", nullable=False
        ),
        sa.Column(
            "pushed_deductible_credit_out", sa.BigInteger(), server_default="0", nullable=False
        ),
        sa.Column("pushed_deductible_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_deductible_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_deductible_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_not_covered_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_not_covered_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_not_covered_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "pushed_out_of_pocket_total", sa.BigInteger(), server_default="0", nullable=False
        ),
        sa.Column("pushed_out_of_pocket_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pushed_out_of_pocket_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["pair_id"],
            ["pair.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code", name="uq_accum"
        ),
    )
    with op.batch_alter_table("accumulator", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_accumulator_dirty_since"), ["dirty_since"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_accumulator_pair_id"), ["pair_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("accumulator", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accumulator_pair_id"))
        batch_op.drop_index(batch_op.f("ix_accumulator_dirty_since"))

    op.drop_table("accumulator")
    with op.batch_alter_table("received_event", schema=None) as batch_op:
        batch_op.drop_index("ix_received_event_claim_version")

    op.drop_table("received_event")
    with op.batch_alter_table("pair", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pair_next_attempt_at"))

    op.drop_table("pair")
    with op.batch_alter_table("ingest_batch", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingest_batch_at"))

    op.drop_table("ingest_batch")
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letter_event_id"))
        batch_op.drop_index(batch_op.f("ix_dead_letter_accumulator_id"))

    op.drop_table("dead_letter")
    op.drop_table("claim")
