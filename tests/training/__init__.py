"""The micro demo model (issue 15): a hand-set pixel VAE, procedural scenes, pixel-statistics metrics and
the trainer of a tiny PixArt-δ (base DiT, LCM copy, ControlNet-Transformer) on our own kernels."""
