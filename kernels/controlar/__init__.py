"""ControlAR (hustvl/ControlAR on LlamaGen): controllable autoregressive text-to-image, pure PyTorch.

- `gpt`: config (read from the weights) and the LlamaGen GPT — 2-D RoPE with zero prefix rows indexed by sequence
  position, static KV cache with the caption-mask rules, prefill + one-token decode, control injection
- `dinov2`: the control encoder (DINOv2 for T2I, ViT for C2I) in transformers-4.x names, the 14-px resize
- `sampling`: CFG on logits, temperature / top-k / top-p, one multinomial per token, the generate loop
  with a per-token callback and a caller's generator
- `vq`: the VQ-16 tokenizer (decoder runs; encoder built for strict loading)
- `checkpoint`: layouts, config from the weights, strict loading, foreign files
- `text`: FLAN-T5-XL captions through kernels/t5.py, left-padded with zeroed pads
- `pipeline`: control image + caption -> tokens -> image in one call; the one size check (`token_grid`)

Imports only the shared modules at the top of `kernels/`, never another family, never ComfyUI.
"""
