"""PixArt-α / PixArt-δ: the DiT (`model`), its checkpoint layouts and strict loading (`checkpoint`), the
ControlNet-Transformer (`controlnet`), RelaCtrl's relevance-guided control (`relactrl`) and LCM sampling
(`lcm`). Imports only the shared modules at the top of `kernels/`, never another family."""
