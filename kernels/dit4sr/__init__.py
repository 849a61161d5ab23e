"""DiT4SR (adam-duan/DiT4SR): the SD3.5-medium MMDiT with an LR stream, pure PyTorch.

- `model`: config (read from the weights) and the MMDiT with the LR stream — AttentionZero in attn / attn2,
  FeedForwardControl (the LR→noise depthwise conv, ×1.2), the released weights' quirks reproduced
- `checkpoint`: the released diffusers layout, the documented dead-tensor list, strict loading, foreign files
- `tiling`: the reference's latent tiling (square tiles ≤ 64, overlap 24, Gaussian weights), batched to a budget
- `tiled_encode`: the LR image's VAE encode in tiles, blended in latent space
- `preprocess`: the reference's input preparation (bicubic upscale, process size)
- `sizes`: what DiT4SR Conditioning accepts, decided from the sizes before anything is allocated
- `colour_fix`: AdaIN / wavelet colour fix against the upscaled input

Imports only the shared modules at the top of `kernels/`, never another family, never ComfyUI.
"""
