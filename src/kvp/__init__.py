"""kvp: KV Packet — recomputation-free, context-independent KV caching for LLMs (arXiv 2604.13226)."""

__version__ = "0.1.0"
