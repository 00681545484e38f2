"""The first schema: api_keys, jobs, job_images, audit_events.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("requests_per_minute", sa.Integer, nullable=False),
        sa.Column("images_per_day", sa.Integer, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("model", sa.String(64), nullable=False, index=True),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("class_label", sa.Integer, nullable=True),
        sa.Column("class_name", sa.String(128), nullable=True),
        sa.Column("prompt", sa.Text, nullable=True),
        sa.Column("negative_prompt", sa.Text, nullable=True),
        sa.Column("n_samples", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("guidance_scale", sa.Float, nullable=True),
        sa.Column("num_inference_steps", sa.Integer, nullable=True),
        sa.Column("n_steps_each", sa.Integer, nullable=True),
        sa.Column("sampler", sa.String(32), nullable=False),
        sa.Column("output_format", sa.String(8), nullable=False),
        sa.Column("quality_check", sa.Boolean, nullable=False),
        sa.Column("api_key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("generated", sa.Integer, nullable=False),
        sa.Column("released", sa.Integer, nullable=False),
        sa.Column("withheld", sa.Integer, nullable=False),
    )
    op.create_table(
        "job_images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("released", sa.Boolean, nullable=False),
        sa.Column("qa_reason", sa.Text, nullable=True),
        sa.Column("nearest_training_distance", sa.Float, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "index", name="uq_job_images_job_index"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("api_key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("client", sa.String(64), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True, index=True),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )


def downgrade() -> None:
    for table in ("audit_events", "job_images", "jobs", "api_keys"):
        op.drop_table(table)
