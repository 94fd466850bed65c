"""job stored bytes

Revision ID: 5c8e2b7f9d13
Revises: 7d2f4a9c1e50
Create Date: 2026-12-02 01:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = "5c8e2b7f9d13"
down_revision: str | Sequence[str] | None = "7d2f4a9c1e50"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: the bytes a job has stored (the per-key storage quota sums them).

    Existing jobs start with their inputs (the sizes in `images`) and their recorded artifacts; checkpoints of
    jobs finished before this revision are not known and count from their next attempt, if any."""
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("stored_bytes", sa.BigInteger(), server_default="0", nullable=False))
    job = sa.table("job", sa.column("id", sa.Uuid()), sa.column("images", sa.JSON()),
                   sa.column("stored_bytes", sa.BigInteger()), sa.column("deleted", sa.Boolean()))  # fmt: skip
    artifact = sa.table("job_artifact", sa.column("job_id", sa.Uuid()), sa.column("size", sa.BigInteger()))
    connection = op.get_bind()
    artifact_bytes = dict(
        connection.execute(
            sa.select(artifact.c.job_id, sa.func.sum(artifact.c.size)).group_by(artifact.c.job_id)
        ).all()
    )
    for job_id, images in connection.execute(sa.select(job.c.id, job.c.images).where(job.c.deleted.is_(False))):
        total = sum(int(image.get("size", 0)) for image in images or []) + int(artifact_bytes.get(job_id) or 0)
        if total:
            connection.execute(sa.update(job).where(job.c.id == job_id).values(stored_bytes=total))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_column("stored_bytes")
