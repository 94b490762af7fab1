"""Where a request may go: the canonical request path, and the addresses egress may reach."""
