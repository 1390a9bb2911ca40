"""Gemma 2 and Gemma 3's text model: a GeGLU MLP, sliding-window and global layers, soft-capped
logits, tied embeddings and a head size of its own. Their modules have Llama's names and roles;
what differs is inside the forward pass koff does not touch (the gates sit on the inputs of
``down_proj`` and ``o_proj`` whatever the activation, and a memory's KV prefix goes through the
hybrid sliding-window cache the model builds). llama.cpp's per-layer graph does not run them: no
GGUF export."""

from koff.models.adapter import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(family="gemma", model_types=("gemma2", "gemma3_text"))
