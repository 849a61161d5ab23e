"""EasyControl condition LoRAs on FLUX.1 (Xiaojiu-z/EasyControl), pure PyTorch.

- `blocks`: FLUX double/single blocks by attribute name (ComfyUI/BFL layout), with and without conditions;
  they run on our `model.Flux` and, duck-typed, on ComfyUI's own block modules
- `condition`: condition slots, position ids, the attention mask, `EasyControl` (slots + KV bank) and
  one call's `ConditionRun`
- `condition_image`: the condition images prepared as the reference pipeline does (spatial / subject)
- `kv_cache`: the bank of condition K/V and its exact key
- `lora`: the released LoRA layout, strict loading, foreign-file errors
- `model`, `checkpoint`: a minimal FLUX.1 in native names (config from the weights, both file layouts)
- `primitives`: sinusoid, RoPE, attention, modulation

Imports only the shared modules at the top of `kernels/`, never another family, never ComfyUI.
"""
