"""Hub kernels stay off: fitune runs no code fetched from the Hugging Face Hub unless a recipe asks for it.

Two libraries fetch code at run time on their own:

- transformers (5.25 and later) "kernelizes" every model ``from_pretrained`` loads unless ``use_kernels=False``
  is passed or ``USE_HUB_KERNELS`` is false, and again at every ``model.train()`` / ``model.eval()``. Where the
  Hub has no kernel for a layer on the device, it falls back to the class's forward by deleting the
  instance's own: the lean norms fitune installs would vanish from a real run while the plan (built with
  ``from_config``, never kernelized) keeps them, and the plan and the run would no longer run the same code.
- bitsandbytes (0.50), when imported on a CPU with AVX512-BF16, asks the ``kernels`` package for a
  4-bit matmul kernel from the Hub, and logs "Failed to load CPU gemm_4bit_forward" when it cannot get one.

``FROM_PRETRAINED`` goes into every ``from_pretrained`` call fitune makes, and ``import_bitsandbytes`` imports
bitsandbytes with the Hub refused, so it uses the kernels it ships (the same ones it falls back to offline).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

FROM_PRETRAINED = {"use_kernels": False}

# what bitsandbytes logs when its CPU backend gets no Hub kernel: with the Hub refused, that is the plan
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NO_HUB_KERNEL = "Failed to load CPU gemm_4bit_forward"


class _DropNoHubKernel(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_NO_HUB_KERNEL)


def _refuse(repo_id: str, *args, **kwargs):
    raise RuntimeError(f"fitune runs no kernel from the Hub ({repo_id})")


def import_bitsandbytes() -> None:
    """Import bitsandbytes (when installed and not yet imported) with ``kernels.get_kernel`` refused.

    Done before peft is imported (peft imports bitsandbytes): the fetch happens once, at import time. An
    installation that fails to import is left alone here; the step that needs it reports the error."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    logging.getLogger(_BNB_CPU_LOGGER).addFilter(_DropNoHubKernel())
    try:
        import kernels
    except ImportError:  # nothing can fetch a kernel
        kernels = None
    original = getattr(kernels, "get_kernel", None)
    if original is not None:
        kernels.get_kernel = _refuse
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises anything; QLoRA reports it when it imports
        pass
    finally:
        if original is not None:
            kernels.get_kernel = original
