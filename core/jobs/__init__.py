"""The training-job domain: states and transitions, ORM models, and the job functions by side (client, worker,
recovery, idempotency)."""
