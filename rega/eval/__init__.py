"""Evaluation, one room per kind of measurement: ``domain`` (task accuracy and F1), ``general`` (judge-free
multiple choice and drift), ``judged`` (LLM-judged MT-Bench and general sets). Here: the plumbing of one run."""
