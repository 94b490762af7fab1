"""Pure engines: no mitmproxy imports, so they can be tested and benchmarked alone."""
