"""Strict YAML: a SafeLoader that refuses duplicate keys instead of keeping the last one.

Shared by the config (config/schema.py) and the rule files (redaction/rules.py): a silently
dropped duplicate key is a silently ignored setting or redaction rule.
"""

from __future__ import annotations

from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(
    loader: StrictLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=deep)
    return result


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load(text: str) -> Any:
    """Parse YAML text strictly; raises `yaml.YAMLError` (with `problem_mark`) on errors."""
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
