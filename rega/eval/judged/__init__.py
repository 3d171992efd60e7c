"""General ability graded by an LLM judge: MT-Bench and the Chinese/English general sets."""
