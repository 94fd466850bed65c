"""The GPU worker: a Celery app whose task runs D-OPSD training for one job at a time."""
