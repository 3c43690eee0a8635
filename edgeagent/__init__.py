"""edgeagent: an edge LLM appliance daemon (small local model first, cloud model when needed)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
