"""Source adapters: dataset formats in, canonical seed records out; the `source` stage
(stages/source.py) runs them.

See stages/sources/base.py for the adapter contract and docs/sources.md for each format.
"""
from stages.sources.base import ADAPTERS, Adapter, adapter_names, get_adapter, register_adapter

__all__ = ["ADAPTERS", "Adapter", "adapter_names", "get_adapter", "register_adapter"]
