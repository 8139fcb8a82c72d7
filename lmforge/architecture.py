"""What lmforge reads from a transformers model's config, whatever its architecture.

Training, evaluation and serving all need these facts; they live here, below all three, so that none of
them imports another for them. The Bento includes this file beside the serving package.
"""

from __future__ import annotations


def context_length(config) -> int:
    """Tokens the model can attend over (GPT-2: n_positions; most others: max_position_embeddings)."""
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 0)
