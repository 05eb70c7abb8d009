"""Every cache-reuse method behind one interface: ``get_method(name, **hyper_params)``.

What each method does: docs/baselines.md.
"""

from __future__ import annotations

from kvp.methods.a3 import A3
from kvp.methods.base import (Method, MethodResult, Prefilled, QueryContext, make_context,
                              run_method, run_methods)
from kvp.methods.cache_blend import CacheBlend
from kvp.methods.epic import Epic
from kvp.methods.full_recompute import FullRecompute
from kvp.methods.kv_packet import KVPacket
from kvp.methods.no_cache import NoCache
from kvp.methods.no_recompute import NoRecompute
from kvp.methods.rand_recompute import RandRecompute
from kvp.methods.sam_kv import SamKV

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoCache, FullRecompute, NoRecompute, KVPacket, CacheBlend, Epic, A3,
                              SamKV, RandRecompute)
}


def get_method(name: str, **params) -> Method:
    """Instantiate a method by name with its hyper-parameters, e.g. ``get_method("epic", n_tokens=32)``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[name](**params)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters {params} for {name!r}: {err}") from err


__all__ = ["METHODS", "Method", "MethodResult", "Prefilled", "QueryContext", "get_method",
           "make_context", "run_method", "run_methods"]
