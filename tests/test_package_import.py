"""The pack imported as ComfyUI imports it (a package, `dit_control`, with relative imports) coexists with
Hugging Face's own `kernels` package, which transformers' hub-kernels integration, diffusers and
bitsandbytes' CPU backend all import. The repository root on sys.path would make our kernels/ shadow it."""
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "kernels"                       # the pack's kernels/, which must never answer `import kernels`
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()


def _inside(path, folder: Path) -> bool:
    return path is not None and folder in Path(path).resolve().parents


def test_hub_kernels_installed():
    # what the rest of this file shows is only worth something while Hugging Face's package is there
    assert importlib.metadata.version("kernels"), "Hugging Face's kernels package is not installed"


def test_repository_root_not_on_sys_path():
    assert REPO not in [Path(p or ".").resolve() for p in sys.path], \
        f"the repository root {REPO} is on sys.path: our kernels/ shadows Hugging Face's kernels"
    import dit_control
    assert Path(dit_control.__file__).resolve().parent == REPO


def test_pack_beside_transformers_diffusers_bitsandbytes_in_this_process():
    """In the test process itself: the pack first, then the three libraries that import `kernels`."""
    import bitsandbytes  # noqa: F401
    import transformers.integrations.hub_kernels as hub
    from diffusers import PixArtTransformer2DModel  # noqa: F401
    from transformers.utils import is_kernels_available

    from dit_control.kernels.int8 import Int8Ops  # noqa: F401
    from dit_control.kernels.pixart.model import PixArt  # noqa: F401

    spec = importlib.util.find_spec("kernels")
    assert not _inside(spec.origin, OURS), f"`import kernels` finds this checkout's {spec.origin}"
    assert _inside(spec.origin, SITE), f"`import kernels` finds {spec.origin}, not the installed package"
    assert _inside(sys.modules["kernels"].__file__, SITE)
    assert is_kernels_available() and hasattr(hub, "CUDAProperties"), "transformers did not take up hub kernels"


_FRESH_PROCESS = """
import json, sys
import dit_control
from dit_control.kernels.pixart.model import PixArt
from dit_control.kernels.t5 import load_t5_encoder_file
import transformers.integrations.hub_kernels as hub
from diffusers import PixArtTransformer2DModel
import bitsandbytes
import kernels
print(json.dumps({"pack": dit_control.__file__, "kernels": kernels.__file__,
                  "hub_kernels": hasattr(hub, "CUDAProperties"),
                  "bitsandbytes": bitsandbytes.__version__}))
"""


def test_pack_beside_transformers_diffusers_bitsandbytes_in_a_fresh_process(tmp_path):
    """As a script or a benchmark starts: a new interpreter of the venv, nothing imported before."""
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["pack"]).resolve().parent == REPO
    assert _inside(seen["kernels"], SITE) and not _inside(seen["kernels"], OURS), seen
    assert seen["hub_kernels"], "transformers did not take up hub kernels"
