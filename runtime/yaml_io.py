"""Safe YAML loading that also rejects duplicate keys (PyYAML silently keeps the last one) and
documents whose aliases expand them past a size limit ("billion laughs")."""

from __future__ import annotations

from typing import Any

import yaml

# Characters of a document written out without its aliases (each scalar counts its length plus
# one, each collection one): the shipped graphs are about 1,500; a few aliases of aliases in a
# 1 KB file reach billions, and every later step (validation, fingerprints, messages) expands them.
MAX_EXPANDED_SIZE = 1_000_000


class DuplicateKeyError(ValueError):
    def __init__(self, key: str, line: int, path: list[str]):
        self.key, self.line, self.path = key, line, path
        where = ".".join(path) or "top level"
        super().__init__(f"line {line}: duplicate key '{key}' under {where}")


class ExpansionError(ValueError):
    """A document whose aliases expand it past ``MAX_EXPANDED_SIZE``, or an alias inside its own anchor."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The size of ``node`` with every alias written out; ``sizes`` remembers shared nodes, so
    the count costs one visit per distinct node however often aliases repeat it."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ExpansionError(f"line {node.start_mark.line + 1}: an alias refers to the anchor that contains it "
                             "(the document would be infinite)")
    if isinstance(node, yaml.ScalarNode):
        size = len(node.value) + 1
    else:
        open_nodes.add(key)
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
        open_nodes.discard(key)
    if size > MAX_EXPANDED_SIZE:
        raise ExpansionError(f"line {node.start_mark.line + 1}: with its aliases written out the document passes "
                             f"{MAX_EXPANDED_SIZE:,} characters (anchors repeated by aliases); refused")
    sizes[key] = size
    return size


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing a document whose aliases expand it past the limit before
    building anything from it."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, set())
        return super().construct_document(node)


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


class _UniqueKeyLoader(_BoundedLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        self._root_node = node
        return super().construct_document(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def load_yaml(text: str) -> Any:
    """Parse YAML with the safe loader; duplicate keys raise ``DuplicateKeyError``, a document
    that aliases expand past ``MAX_EXPANDED_SIZE`` ``ExpansionError``."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (numbers, booleans, lists, null), within the
    same size limit as graph files."""
    return yaml.load(text, Loader=_BoundedLoader) if text.strip() else ""  # noqa: S506 - a SafeLoader subclass
