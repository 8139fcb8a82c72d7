"""lmforge: train, gate and ship small language models (DVC + Prefect + torchrun + BentoML)."""
