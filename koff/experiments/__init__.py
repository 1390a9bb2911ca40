"""The comparisons `koff eval` prints: the ablation table of runs and exports (``ablation``) and
downstream tasks through lm-evaluation-harness (``lmeval``).

They sit above training, export and runtime, whose models they compare, and nothing below imports them.
(The decomposition pipeline lives in ``koff.training.pipeline``; code only benchmarks use, such as
the sparsity sweep and runs in parallel processes, lives in ``bench/``.)"""
