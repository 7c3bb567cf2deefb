"""The Multiplane inference process: HTTP API, job queue and command line."""

__version__ = "0.1.0"
