"""Accelerator devices: which environment variable pins a process to one.

A leaf of the library core: the workers pin themselves with it, and the serving operators
read it back to record which device an engine daemon inherited.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

VISIBLE_DEVICES_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
"""Per accelerator resource class, the variable that limits a process to its devices."""


def pinned_device(resource_class: str, environ: Mapping[str, str] = os.environ) -> str:
    """``cuda:1`` when this process is pinned to device 1 of class ``cuda``; the bare class
    when it is not pinned (or the class has no devices, like ``cpu``)."""
    visible = environ.get(VISIBLE_DEVICES_ENV.get(resource_class, ""), "")
    return f"{resource_class}:{visible}" if visible else resource_class
