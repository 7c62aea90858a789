"""The wire: the protocol's messages, their encoding, and the websocket transport.

``protocol`` and ``codec`` do no I/O and import no trio; ``transport`` is the one place
that knows the websocket libraries, shared by both ends.
"""
