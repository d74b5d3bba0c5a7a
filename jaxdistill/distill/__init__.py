"""Distillation: losses, multi-teacher objectives, the fused train step."""
