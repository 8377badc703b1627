"""The package's version, in a module of its own so that the cache's manifest can record it without importing
the package's top level (which lazily imports the cache)."""

__version__ = "0.2.0"
