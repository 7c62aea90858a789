"""The wire: the protocol's messages, their encoding, and the websocket transport.

``protocol`` and ``codec`` do no I/O and import no trio; ``transport`` (serving and
connecting) and ``channels`` (the connections and their handshakes) are the modules
that know the websocket libraries, shared by both ends.
"""
