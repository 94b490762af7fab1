"""sluicegate: a security gateway for AI coding agents, built as mitmproxy addons."""

__version__ = "0.1.0"
