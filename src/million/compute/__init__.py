"""The computation: the partition tree, its workers, the lobby, plugins and runs.

It knows plugins and sessions, not sockets.
"""
