"""Thin mitmproxy adapters over the pure engines, one concern per module."""
