"""Where the Triton kernels run in tests: compiled on a GPU, else in Triton's interpreter.

Imported first by this folder's conftest, so ``TRITON_INTERPRET`` is set before any module
imports the kernels, whichever test module runs first (the kernels' ``@triton.jit`` decides
its mode when it is applied)."""

from __future__ import annotations

import os

from deepflow.engine.device import Device

DEVICE = Device.pick()
INTERPRET = not DEVICE.is_accelerator
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:  # test modules that need Triton skip themselves
        interpreter = None
    if interpreter is not None:
        _patch_tensor = interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
            # Triton 3.6's interpreter holds scalars as one-element arrays and int()s them for
            # loop bounds, which numpy >= 2.4 refuses: index through the single element instead.
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = _patch_lang_tensor
