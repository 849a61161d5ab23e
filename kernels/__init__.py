"""Pure-PyTorch model and image kernels for dit-control; nothing here imports ComfyUI. One subpackage per
model family (pixart, flux_easycontrol, dit4sr, controlar); at the top what several share: checkpoint_io,
int8, t5, tiled_decode, and control preprocessing (hed, canny, control_image). kernels/README.md."""
