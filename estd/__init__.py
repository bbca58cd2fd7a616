"""estd: an EST (RFC 7030) certificate enrollment server built on Twisted."""

__version__ = "0.1.0"
