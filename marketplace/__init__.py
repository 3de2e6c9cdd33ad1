"""Share-of-Model marketplace service: HTTP API, DB, catalog, jobs, ledger, agent, CLI, SDK."""

__version__ = "0.1.0"
