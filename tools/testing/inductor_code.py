"""Reading the code TorchInductor generates (``torch._inductor.utils.run_and_get_code``)."""
from __future__ import annotations

import re

import torch


def buffer_numels(code: str) -> list[int]:
    """The element count of every buffer the generated ``code`` allocates (``empty_strided_*``)."""
    shapes = re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)
    numels = []
    for shape in shapes:
        dims = [int(d) for d in shape.replace(" ", "").split(",") if d]
        numels.append(int(torch.tensor(dims).prod()) if dims else 1)
    return numels
