"""Provider adapters: one file per API's event shapes (which fields are text channels, their role,
when each channel ends). Add a provider by adding a file and listing it in `adapters`."""

from __future__ import annotations

from sluicegate.shapes.channels import Adapter, Channels
from sluicegate.shapes.providers.anthropic_messages import AnthropicMessages
from sluicegate.shapes.providers.openai_chat import ChatCompletions
from sluicegate.shapes.providers.openai_responses import Responses


def adapters(channels: Channels) -> tuple[Adapter, ...]:
    """Every known provider's adapter over `channels`, tried in this order (first match wins;
    an event no adapter matches is unknown JSON: all its strings are key-addressed values)."""
    return (ChatCompletions(channels), Responses(channels), AnthropicMessages(channels))
