"""Differential privacy: per-example gradients of adapter factors, DP-SGD, client-level DP-FedAvg, accounting."""
