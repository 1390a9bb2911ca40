"""The model families koff supports, one adapter per file (see ``koff.models.adapter``)."""

from koff.models.families import gemma, llama

FAMILIES = (llama.ADAPTER, gemma.ADAPTER)
