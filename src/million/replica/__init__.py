"""Replication: deterministic models, local views, sessions, and the client.

Snapshot + ordered events -> the same state on every participant.
"""
