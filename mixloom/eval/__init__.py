"""Evaluation: multiple-choice tasks, protocols and a scorer running many adapters in one
fused eval-mode forward."""
