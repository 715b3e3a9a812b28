"""Sample-level differential privacy: per-example gradients of adapter factors, DP-SGD, accounting."""
