"""End-to-end test harness: local upstreams, a real mitmdump running the gateway, test tokens."""
