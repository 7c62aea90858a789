"""The relay: the reflector, which orders, stamps, stores and relays session events.

Generic: it knows sessions, participants and opaque JSON, nothing about what models do.
"""
