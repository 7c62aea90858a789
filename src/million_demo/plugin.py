"""The demo plugin's hooks. The partition hooks arrive with the computation layer."""
