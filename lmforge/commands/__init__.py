"""The commands of `lmforge`, by what they act on; lmforge/cli.py registers them."""
