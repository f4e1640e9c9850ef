"""Source adapters and the `source` stage: dataset formats in, canonical seed records out.

See stages/sources/base.py for the adapter contract and docs/sources.md for each format.
"""
from stages.sources.base import ADAPTERS, Adapter, adapter_names, get_adapter, register_adapter

__all__ = ["ADAPTERS", "Adapter", "adapter_names", "get_adapter", "register_adapter"]
