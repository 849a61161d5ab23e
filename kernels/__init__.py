"""Pure-PyTorch model and image kernels for dit-control; nothing here imports ComfyUI."""
