"""The training-job domain: states, ORM models, the spec clients send, and the service functions."""
