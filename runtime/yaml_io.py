"""Safe YAML loading that also rejects duplicate keys (PyYAML silently keeps the last one)."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    def __init__(self, key: str, line: int, path: list[str]):
        self.key, self.line, self.path = key, line, path
        where = ".".join(path) or "top level"
        super().__init__(f"line {line}: duplicate key '{key}' under {where}")


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise DuplicateKeyError(str(key), key_node.start_mark.line + 1, _path_of(loader, node))
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _path_of(loader: _UniqueKeyLoader, target: yaml.Node) -> list[str]:
    """The chain of keys leading to ``target`` (for the error message)."""
    def walk(node: yaml.Node, trail: list[str]) -> list[str] | None:
        if node is target:
            return trail
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                found = walk(v, trail + [str(getattr(k, "value", k))])
                if found is not None:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                found = walk(v, trail + [str(i)])
                if found is not None:
                    return found
        return None

    root = getattr(loader, "_root_node", None)
    return (walk(root, []) if root is not None else None) or []


class _RootTrackingLoader(_UniqueKeyLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        self._root_node = node
        return super().construct_document(node)


_RootTrackingLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def load_yaml(text: str) -> Any:
    """Parse YAML with the safe loader; duplicate keys raise ``DuplicateKeyError``."""
    return yaml.load(text, Loader=_RootTrackingLoader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (numbers, booleans, lists, null)."""
    return yaml.safe_load(text) if text.strip() else ""
