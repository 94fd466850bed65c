"""What the API and the worker share: settings, database models, the job state machine, storage and queues."""
