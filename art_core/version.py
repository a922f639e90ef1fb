"""The art-core version, in one place: the package, the ``art`` CLI and plugin listings read it from here."""

__version__ = "0.1.0"
