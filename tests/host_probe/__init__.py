"""A test-only ComfyUI custom node pack: reads the running host's own internals over HTTP, so tests
compare the pack with what *this* host does instead of with a copied rule. Loaded only by test servers
(`ComfyServer(probe=True)`); never shipped (tests/ is in .comfyignore).

- DiTControlProbe_SamplerNoise: the noise core's samplers draw for a latent and seed on this host —
  the initial noise (`comfy.sample.prepare_noise`, what KSampler and SamplerCustom's RandomNoise use)
  followed by `draws` step-noise draws of `k_diffusion.sampling.default_noise_sampler`.
- DiTControlProbe_PatcherClass: the class of a MODEL's patcher, the class core's own loaders would
  build for the same devices (`comfy.model_patcher.CoreModelPatcher`, rebound at start-up on NVIDIA), and
  whether its reloader (`cached_patcher_init`, v0.33) rebuilds the same weights from the file.
- DiTControlProbe_FluxConditioningStandIn: the CI stand-in for DualCLIPLoader (type flux) + CLIPTextEncode:
  Flux-shaped CONDITIONING (context [1, tokens, 4096] like T5-XXL, pooled_output [1, 768] like CLIP-L)
  drawn deterministically from the text (seeded by its SHA-256), so a changed prompt changes both. The
  API tests of the EasyControl workflows swap core's text nodes for it (real-size encoders are too heavy
  for CI); the shipped workflows keep core's nodes.
- DiTControlProbe_SD3ConditioningStandIn: the same for SD3's TripleCLIPLoader + CLIPTextEncode (context
  [1, 154, 4096] like CLIP-L + CLIP-G + T5-XXL, pooled_output [1, 2048]), for the DiT4SR API tests.
- DiTControlProbe_ImageTokens: the token ids of a ControlAR IMAGE_TOKENS wire as JSON in the history (the
  pack has no node that shows tokens; the ControlAR API tests compare them exactly).
- DiTControlProbe_TextReport: a STRING output (a loader's description or variant) as UI text in the history.
- DiTControlProbe_SigmasReport: a SIGMAS list (e.g. core's BasicScheduler on a MODEL) as JSON text, to compare
  the shipped sampler/scheduler pair with the reference schedule.
- DiTControlProbe_EasyControlBankWatch / _EasyControlBankReport: the watch clones an EasyControl MODEL and
  adds a DIFFUSION_MODEL wrapper that, after every model call, takes weak references to the KV bank's
  tensors and records the bank's size; the report (run after the sampler's LATENT) tells how many of those
  tensors are still alive once the sampling run has ended, after gc.
- DiTControlProbe_VAEMoments: a KL VAE's raw posterior moments [B, 2C, h, w] (encoder [+ quant_conv], read
  here from core's VAE object, not through the pack) of an image, as a LATENT for SaveLatent: the tests draw the
  reference's posterior sample from them by hand.
- DiTControlProbe_EasyControlConditions: the condition latents an EasyControl MODEL's blocks see (after a
  sampling run when `samples` is linked: a posterior sample is drawn when the run starts), stacked along the
  height, and the conditions' prepared images stacked the same way (what the reference encodes as one tall image).
- DiTControlProbe_ConditioningLatent: the tensor a CONDITIONING carries under a key (DiT4SR's LR latent), as a LATENT.
- DiTControlProbe_EasyControlConditionImage: the prepared pixels of an EasyControl MODEL's last condition (what
  the VAE encodes for the condition stream), 8-bit, as base64 text in the history.
- newer_core.py: DiTControlProbe_HintlessControlBase / _FastDiskHost, core changes newer than our hosts
  simulated on the running host's classes (the post-v0.33 guards' tests); device_stats.py: peak accelerator
  memory and image statistics for tests/benchmarks/gpu_check.py.
V1 registration: it must run unchanged on every host the suite uses.
"""
import gc
import json
import weakref

import torch

import comfy.k_diffusion.sampling
import comfy.model_patcher
import comfy.sample

from .report_node import ReportNode


class SamplerNoise:
    CATEGORY = "DiT Control tests"
    FUNCTION = "draw"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
                             "draws": ("INT", {"default": 4, "min": 0, "max": 100})}}

    def draw(self, samples, seed, draws):
        latent = samples["samples"]
        initial = comfy.sample.prepare_noise(latent, seed)
        step = comfy.k_diffusion.sampling.default_noise_sampler(latent, seed=seed)
        sigma = torch.tensor(1.0)
        out = [initial] + [step(sigma, sigma) for _ in range(draws)]
        return ({"samples": torch.cat(out, dim=0)},)


def _class_name(obj_type) -> str:
    return f"{obj_type.__module__}.{obj_type.__qualname__}"


class PatcherClass(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def report(self, model):
        core_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        core_pick = core_class(torch.nn.Linear(1, 1), load_device=model.load_device,
                               offload_device=model.offload_device)
        reloader = getattr(model, "cached_patcher_init", None)
        report = {"patcher": _class_name(type(model)), "core_picks": _class_name(type(core_pick)),
                  "has_reloader": reloader is not None, "reload_matches": None}
        if reloader is not None:
            # what v0.33's clone(disable_dynamic=True) and multi-GPU clones call: a fresh patcher from the file
            again = reloader[0](*reloader[1], disable_dynamic=True)
            want, got = model.model.state_dict(), again.model.state_dict()
            report["reload_matches"] = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        return {"ui": {"text": [json.dumps(report)]}}


class ConditioningStandIn:
    """CONDITIONING of a text encoder's shapes, drawn from the text (seeded by its SHA-256)."""
    CATEGORY = "DiT Control tests"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    TOKENS, MAX_TOKENS, CONTEXT_WIDTH, POOLED_WIDTH = 256, 512, 4096, 768

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "default": ""}),
                             "tokens": ("INT", {"default": cls.TOKENS, "min": 1, "max": cls.MAX_TOKENS})}}

    def encode(self, text, tokens):
        import hashlib
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, self.CONTEXT_WIDTH, generator=gen)
        pooled = torch.randn(1, self.POOLED_WIDTH, generator=gen)
        return ([[context, {"pooled_output": pooled}]],)


class FluxConditioningStandIn(ConditioningStandIn):
    TOKENS, MAX_TOKENS, POOLED_WIDTH = 256, 512, 768          # T5-XXL tokens, CLIP-L pooled


class SD3ConditioningStandIn(ConditioningStandIn):
    TOKENS, MAX_TOKENS, POOLED_WIDTH = 154, 1024, 2048        # CLIP-L + CLIP-G + T5-XXL tokens, L + G pooled


class ImageTokens(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image_tokens": ("IMAGE_TOKENS",)}}

    def report(self, image_tokens):
        t = image_tokens
        return {"ui": {"text": [json.dumps({"tokens": t.tokens.tolist(), "rows": t.rows, "cols": t.cols})]}}


class TextReport(ReportNode):
    """A STRING output (a loader's description or variant) as UI text, for the API tests to read."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    def report(self, text):
        return {"ui": {"text": [text]}}


class SigmasReport(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",)}}

    def report(self, sigmas):
        return {"ui": {"text": [json.dumps({"sigmas": [float(s) for s in sigmas], "dtype": str(sigmas.dtype)})]}}


class VAEMoments:
    CATEGORY = "DiT Control tests"
    FUNCTION = "moments"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "image": ("IMAGE",)}}

    def moments(self, vae, image):
        import comfy.model_management
        comfy.model_management.load_models_gpu([vae.patcher])
        model = vae.first_stage_model
        x = vae.process_input(image[..., :3].movedim(-1, 1)).to(vae.vae_dtype).to(vae.device)
        with torch.no_grad():
            z = model.encoder(x)
            if getattr(model, "quant_conv", None) is not None:       # FLUX's VAE has one, SD3's not
                z = model.quant_conv(z)
        return ({"samples": z.to(vae.output_device).float()},)


class EasyControlConditions:
    CATEGORY = "DiT Control tests"
    FUNCTION = "report"
    RETURN_TYPES = ("LATENT", "IMAGE")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "optional": {"samples": ("LATENT",)}}

    def report(self, model, samples=None):
        spec = model.model_options["transformer_options"][EASYCONTROL_SPEC_KEY]
        latents = torch.cat([c.latent for c in spec.conditions], dim=-2)
        return ({"samples": latents}, torch.cat([s.pixels for s in spec.sources], dim=1))


class ConditioningLatent:
    CATEGORY = "DiT Control tests"
    FUNCTION = "read"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "key": ("STRING", {"default": "dit4sr_lr_latent"})}}

    def read(self, conditioning, key):
        return ({"samples": conditioning[0][1][key]},)


EASYCONTROL_SPEC_KEY = "dit_control_easycontrol"     # nodes/easycontrol/model.py SPEC_KEY
BANK_WATCHES = {}                                    # tag -> record of one watched model


class EasyControlBankWatch:
    CATEGORY = "DiT Control tests"
    FUNCTION = "watch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "watch"})}}

    def watch(self, model, tag):
        import comfy.patcher_extension
        spec = model.model_options["transformer_options"][EASYCONTROL_SPEC_KEY]
        record = BANK_WATCHES[tag] = {"refs": [], "calls": 0, "peak_bytes": 0, "peak_entries": 0}

        def wrapper(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            bank = spec.easycontrol.bank
            record["calls"] += 1
            record["peak_bytes"] = max(record["peak_bytes"], bank.nbytes)
            record["peak_entries"] = max(record["peak_entries"], len(bank))
            seen = {id(r()) for r in record["refs"] if r() is not None}
            for _, entry in bank.entries:
                for pair in entry.kv.values():
                    record["refs"] += [weakref.ref(t) for t in pair if id(t) not in seen]
            return out

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "dit_control_probe", wrapper)
        return (m,)


class EasyControlBankReport(ReportNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "tag": ("STRING", {"default": "watch"})}}

    def report(self, samples, tag):
        record = BANK_WATCHES.pop(tag)
        gc.collect()
        alive = [r() for r in record["refs"] if r() is not None]
        report = {"calls": record["calls"], "peak_bytes": record["peak_bytes"], "peak_entries": record["peak_entries"],
                  "watched_tensors": len(record["refs"]), "alive_tensors": len(alive),
                  "alive_bytes": sum(t.numel() * t.element_size() for t in alive)}
        return {"ui": {"text": [json.dumps(report)]}}


class EasyControlConditionImage(ReportNode):
    """The pixels an EasyControl MODEL's last condition hands the condition stream (prepared, before the VAE):
    8-bit (they are 8-bit after the Lanczos resize), base64 in the history, for comparing with the reference's
    preparation of the same input bit for bit."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def report(self, model):
        import base64
        pixels = model.model_options["transformer_options"][EASYCONTROL_SPEC_KEY].sources[-1].pixels
        levels = (pixels.float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
        return {"ui": {"text": [json.dumps({"shape": list(levels.shape),
                                            "uint8": base64.b64encode(levels.numpy().tobytes()).decode()})]}}


NODE_CLASS_MAPPINGS = {"DiTControlProbe_FluxConditioningStandIn": FluxConditioningStandIn,
                       "DiTControlProbe_SD3ConditioningStandIn": SD3ConditioningStandIn,
                       "DiTControlProbe_SamplerNoise": SamplerNoise, "DiTControlProbe_PatcherClass": PatcherClass,
                       "DiTControlProbe_ImageTokens": ImageTokens, "DiTControlProbe_TextReport": TextReport,
                       "DiTControlProbe_SigmasReport": SigmasReport,
                       "DiTControlProbe_EasyControlBankWatch": EasyControlBankWatch,
                       "DiTControlProbe_EasyControlBankReport": EasyControlBankReport,
                       "DiTControlProbe_VAEMoments": VAEMoments,
                       "DiTControlProbe_EasyControlConditions": EasyControlConditions,
                       "DiTControlProbe_ConditioningLatent": ConditioningLatent,
                       "DiTControlProbe_EasyControlConditionImage": EasyControlConditionImage}


# core changes newer than the hosts we have, simulated on the running host's classes (newer_core.py)
# and the device readings of the GPU check (device_stats.py)
from .device_stats import NODE_CLASS_MAPPINGS as _DEVICE_STATS_NODES  # noqa: E402
from .newer_core import NODE_CLASS_MAPPINGS as _NEWER_CORE_NODES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_NEWER_CORE_NODES)
NODE_CLASS_MAPPINGS.update(_DEVICE_STATS_NODES)
