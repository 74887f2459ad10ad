"""Pytrees: nested containers (dict, list, tuple, namedtuple, dataclass, None) of leaves.

`flatten` returns the leaves with a `TreeDef` that rebuilds the structure; `leaf_paths` gives each
leaf a dotted name built from dict keys, field names and list positions, which is how graph inputs,
outputs and constants get their names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple


class TreeDef(NamedTuple):
    """The structure of a pytree: a node kind, its static data and its children's TreeDefs."""

    kind: str  # "leaf", "none", "dict", "list", "tuple", "namedtuple", "dataclass"
    data: Any  # dict keys, namedtuple/dataclass type, ...
    children: tuple["TreeDef", ...]

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(child.num_leaves for child in self.children)


LEAF = TreeDef("leaf", None, ())


def _children(tree: Any) -> tuple[str, Any, list[tuple[str, Any]]] | None:
    """(kind, data, [(key, child)]) for a container, None for a leaf."""
    if tree is None:
        return "none", None, []
    if isinstance(tree, dict):
        keys = tuple(tree.keys())
        return "dict", keys, [(str(k), tree[k]) for k in keys]
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return "namedtuple", type(tree), list(zip(tree._fields, tree))
    if isinstance(tree, (list, tuple)):
        return ("list" if isinstance(tree, list) else "tuple"), None, [(str(i), x) for i, x in enumerate(tree)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        names = tuple(f.name for f in dataclasses.fields(tree))
        return "dataclass", (type(tree), names), [(n, getattr(tree, n)) for n in names]
    return None


def flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    leaves: list[Any] = []

    def visit(node: Any) -> TreeDef:
        parts = _children(node)
        if parts is None:
            leaves.append(node)
            return LEAF
        kind, data, items = parts
        return TreeDef(kind, data, tuple(visit(child) for _, child in items))

    return leaves, visit(tree)


def flatten_like(treedef: TreeDef, tree: Any) -> list[Any]:
    """The leaves of `tree` in the order of `treedef`: dict entries are matched by key, not by
    position. Raises ValueError naming the first place where the structures differ."""
    leaves: list[Any] = []

    def visit(td: TreeDef, node: Any, path: str) -> None:
        if td.kind == "leaf":
            leaves.append(node)
            return
        parts = _children(node)
        where = path or "the arguments"
        if parts is None or parts[0] != td.kind:
            raise ValueError(f"{where}: expected a {td.kind}, got {type(node).__name__}")
        kind, data, items = parts
        if kind == "dict":
            if set(data) != set(td.data):
                raise ValueError(f"{where}: expected keys {sorted(map(str, td.data))}, got {sorted(map(str, data))}")
            items = [(str(k), node[k]) for k in td.data]
        elif len(items) != len(td.children):
            raise ValueError(f"{where}: expected {len(td.children)} entries, got {len(items)}")
        for (key, child), child_td in zip(items, td.children):
            visit(child_td, child, f"{path}.{key}" if path else key)

    visit(treedef, tree, "")
    return leaves


def leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves in flatten order: `{"a": [x, y]}` -> ["a.0", "a.1"]."""
    paths: list[str] = []

    def visit(node: Any, path: str) -> None:
        parts = _children(node)
        if parts is None:
            paths.append(path)
            return
        for key, child in parts[2]:
            visit(child, f"{path}.{key}" if path else key)

    visit(tree, prefix)
    return paths


def unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    it = iter(leaves)

    def build(td: TreeDef) -> Any:
        if td.kind == "leaf":
            return next(it)
        children = [build(child) for child in td.children]
        if td.kind == "none":
            return None
        if td.kind == "dict":
            return dict(zip(td.data, children))
        if td.kind == "list":
            return children
        if td.kind == "tuple":
            return tuple(children)
        if td.kind == "namedtuple":
            return td.data(*children)
        if td.kind == "dataclass":
            cls, names = td.data
            return cls(**dict(zip(names, children)))
        raise AssertionError(td.kind)

    return build(treedef)


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    leaves, treedef = flatten(tree)
    return unflatten(treedef, [fn(leaf) for leaf in leaves])
