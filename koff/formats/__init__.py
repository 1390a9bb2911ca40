"""koff's file formats, each with one owner: the run folder that ``koff decompose`` writes, a run's
memories, the exported backbone and the exported (PEFT-format) memories.

They sit below training, export, runtime and evaluation, so that each of those reads and writes
them here and none reads another's internals.
"""
