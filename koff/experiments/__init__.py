"""Experiments that combine training and evaluation: the ablation table and the sparsity sweep.

They sit above training, export, runtime and evaluation, which never import them."""
