"""Flax NNX models: decoder and encoder backbones, task heads."""
