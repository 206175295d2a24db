"""The conditioning kinds (paper §3.3, §4.1, §4.3-4.5), one module each, and their registry."""
from ldm.kinds.base import KINDS, CacheMismatch, Input, Kind, kind_of, register
from ldm.kinds import text, label, none, lowres, inpaint, semantic, layout, text_pooled  # noqa: F401,E402 - each registers itself

__all__ = ["KINDS", "CacheMismatch", "Input", "Kind", "kind_of", "register"]
