__version__ = "0.1.0"
# Bumped whenever the wire layout changes (FORMAT.md). Receivers refuse others.
FORMAT_VERSION = 3
