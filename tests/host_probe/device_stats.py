"""Test-only nodes the GPU check (tests/benchmarks/gpu_check.py) reads the server's device with.

- DiTControlProbe_ResetPeakMemory (nonce): resets the accelerator's peak-memory counters (a prompt of its own,
  queued before the graph it measures; the nonce keeps core from answering it from the cache).
- DiTControlProbe_PeakMemory (nonce): the peak allocated / reserved accelerator memory since the last reset,
  and the device's name, as JSON text (on the CPU: zeros and "cpu").
- DiTControlProbe_ImageStats (IMAGE): the image batch's shape, whether every value is finite, its range, as JSON
  text: the check's "outputs finite, images of the right size" reads this before SaveImage rounds to 8 bits.
"""
import json

import torch

from .report_node import ReportNode


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class ResetPeakMemory(ReportNode):
    FUNCTION = "reset"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def reset(self, nonce):
        if _cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return {"ui": {"text": [json.dumps({"reset": nonce})]}}


class PeakMemory(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def report(self, nonce):
        if _cuda():
            torch.cuda.synchronize()
            report = {"device": torch.cuda.get_device_name(), "peak_allocated": torch.cuda.max_memory_allocated(),
                      "peak_reserved": torch.cuda.max_memory_reserved()}
        else:
            report = {"device": "cpu", "peak_allocated": 0, "peak_reserved": 0}
        return {"ui": {"text": [json.dumps(report)]}}


class ImageStats(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def report(self, images):
        finite = bool(torch.isfinite(images).all())
        report = {"shape": list(images.shape), "finite": finite,
                  "min": float(images.min()) if finite else None, "max": float(images.max()) if finite else None}
        return {"ui": {"text": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"DiTControlProbe_ResetPeakMemory": ResetPeakMemory, "DiTControlProbe_PeakMemory": PeakMemory,
                       "DiTControlProbe_ImageStats": ImageStats}
