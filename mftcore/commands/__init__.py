"""User commands built on the library (`mftcore bench`, ...): cli.py parses, these do the work."""
