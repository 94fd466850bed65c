"""job report

Revision ID: 3b7e1c9d2a41
Revises: 06f96524a334
Create Date: 2026-12-01 23:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = "3b7e1c9d2a41"
down_revision: str | Sequence[str] | None = "06f96524a334"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: the evaluation report of a succeeded training job."""
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("report", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_column("report")
