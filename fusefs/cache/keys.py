"""Cache keys: a block's identity, as diskcache stores it.

A key is the JSON list [format, source, object key, object version, block size, block index]:
a changed object has a new version and so new keys (no invalidation protocol), and a new
stored layout has a new format tag (blocks of an older layout are never looked up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses

#: First element of every cache key: the layout of the stored value (``integrity``).
KEY_FORMAT = "b1"


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Identity of one cached block; ``cache_key`` is what diskcache stores."""

    source: str
    key: str
    version: str
    block_size: int
    index: int
    #: Computed once: every read looks a block up by it, often more than once.
    cache_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # json.dumps([KEY_FORMAT, source, key, version, block_size, index]), character for
        # character (keys in existing caches must match), without the encoder's per-call setup
        object.__setattr__(
            self, "cache_key",
            f'["{KEY_FORMAT}", {_json_str(self.source)}, {_json_str(self.key)}, '
            f"{_json_str(self.version)}, {int(self.block_size)}, {int(self.index)}]")

    @property
    def tag(self) -> str:
        return object_tag(self.source, self.key)


def object_tag(source: str, key: str) -> str:
    return json.dumps([source, key])


def parse_cache_key(cache_key: str) -> tuple[str, str, str, int, int] | None:
    """(source, key, version, block size, index) of a current-format cache key, else None."""
    try:
        fmt, s, k, v, bs, i = json.loads(cache_key)
        if fmt != KEY_FORMAT:
            return None
        return str(s), str(k), str(v), int(bs), int(i)
    except (ValueError, TypeError):
        return None
