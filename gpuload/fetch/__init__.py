"""Fetch: coalesced, concurrent, retried byte-range reads into preallocated buffers."""

from ..retry import RetryPolicy, is_transient
from .cache import BlockCache, CacheOptions
from .fetcher import Fetcher, FetchOptions
from .ranges import Groups, Read, ReadPlan, coalesce, coalesce_plan

__all__ = [
    "BlockCache",
    "CacheOptions",
    "FetchOptions",
    "Fetcher",
    "Groups",
    "ReadPlan",
    "coalesce_plan",
    "Read",
    "RetryPolicy",
    "coalesce",
    "is_transient",
]
