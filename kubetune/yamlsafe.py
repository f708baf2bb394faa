"""YAML documents from people and pipelines, read so that no file can cost more than its size suggests.

`yaml.safe_load` builds no objects from tags, but it keeps aliases as shared references: a 535-byte
"billion laughs" file loads instantly and then expands to gigabytes the first time anything walks it
(an error message that prints the value, a deepcopy, a JSON dump). Here every document's expanded size
is counted (shared nodes counted each time they are reached, memoized per node, so the count itself is
linear) and a document that expands past MAX_NODES nodes, or uses more than MAX_ALIASES aliases, is
refused with a message naming the limit. Real FineTuneJobs have a few dozen nodes.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.errors import SpecError

MAX_NODES = 10_000
MAX_ALIASES = 100


class _CountingLoader(yaml.SafeLoader):
    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.YAMLError(f"line {event.start_mark.line + 1}: more than {MAX_ALIASES} YAML aliases "
                                     "(anchors and * references); refusing to expand them")
        return super().compose_node(parent, index)


def expanded_size(value: Any) -> int:
    """The number of nodes `value` has when every shared reference is expanded (memoized: linear time)."""
    memo: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key not in memo:
            memo[key] = 0  # a cycle (a recursive alias) counts once, then as a leaf
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            memo[key] = min(1 + sum(size(child) for child in children), MAX_NODES + 1)
        return memo[key]

    return size(value)


def load_all(text: str, label: str) -> list[Any]:
    """Every document in text (empty ones dropped); SpecError (exit 2) for bad or oversized YAML."""
    loader = _CountingLoader(text)
    docs: list[Any] = []
    try:
        while loader.check_data():
            doc = loader.get_data()
            if doc is None:
                continue
            if expanded_size(doc) > MAX_NODES:
                raise SpecError(f"{label}: document {len(docs) + 1} expands to more than {MAX_NODES} YAML nodes "
                                "(aliases); a FineTuneJob has a few dozen")
            docs.append(doc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{label}:{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise SpecError(f"{label}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return docs
