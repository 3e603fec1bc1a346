"""superd: an inetd-style superserver."""

__version__ = "0.1.0"
