"""million-demo: the reference plugin for million."""
