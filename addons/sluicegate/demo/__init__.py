"""The demo: a local OpenAI- and Anthropic-shaped upstream the dev gateway serves, so that
`python -m sluicegate demo` shows a round trip (key injected, secrets redacted, flow recorded) on
a machine that cannot reach the real APIs. Development only; never part of the gateway chain.
"""
