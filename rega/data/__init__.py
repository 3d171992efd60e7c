"""Data: record schema and loaders, role prompts, corpus strategies, chat rendering."""
