"""REGA: role prompting guided multi-domain adaptation of chat LLMs that keeps their general ability."""

__version__ = "0.1.0"
