"""job deletion times

Revision ID: 7d2f4a9c1e50
Revises: 3b7e1c9d2a41
Create Date: 2026-12-02 01:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = "7d2f4a9c1e50"
down_revision: str | Sequence[str] | None = "3b7e1c9d2a41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: when a job was deleted, when its objects were found gone, when its personal data was erased.

    Jobs deleted before this revision count as deleted now: the sweep deletes what they left in storage and erases
    their data after the grace period."""
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("objects_deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("data_erased_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(sa.text("UPDATE job SET deleted_at = CURRENT_TIMESTAMP WHERE deleted"))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_column("data_erased_at")
        batch_op.drop_column("objects_deleted_at")
        batch_op.drop_column("deleted_at")
