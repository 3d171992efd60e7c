"""Domain ability: each task's answers under a prompt rule, scored by accuracy (closed tasks) or unigram F1."""
