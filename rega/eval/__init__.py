"""Evaluation: domain metrics, LLM judge, MT-Bench, Chinese/English general evaluation, judge-free retention."""
