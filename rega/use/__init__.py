"""Using a trained model: ``rega chat`` (talk to it) and ``rega predict`` (answer a file of records).

Only :mod:`rega.cli` imports this package; it builds on :mod:`rega.data` (records, prompts, chat rendering),
:mod:`rega.modules` (loading, generation) and :mod:`rega.distill` (the restartable shard protocol).
"""
