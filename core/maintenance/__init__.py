"""Maintenance: the periodic work no request triggers. The reaper (jobs of dead workers back to the queue, lost
messages sent again, old idempotency records dropped), retention (old jobs' stored objects deleted) and the
webhook sender (due deliveries from the outbox).

Each pass takes its dependencies explicitly (settings, a sessionmaker, the store, a broker sender), so it runs in
its own process (`dopsd maintain`, the production shape) or inside the API (embedded mode) alike. Every step is a
conditional UPDATE or a claim, so any number of such processes may run at once.
"""
