"""What every foreign layout shares: renaming a state dict by ``(pattern, replacement)`` rules
into the official names (facebookresearch/ConvNeXt ``models/convnext.py``), with the official
shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

#: ``[(regular expression, replacement)]``, applied in order; the first match wins.  A
#: replacement is a ``re.sub`` template or a function of the match.
Rules = list[tuple[str, str | Callable[[re.Match], str]]]


def rename(
    state_dict: dict[str, np.ndarray],
    rules: Rules,
    layout: str,
    *,
    name_of: Callable[[str], str] | None = None,
    value_of: Callable[[str, str, np.ndarray], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``state_dict`` with every key renamed by the first of ``rules`` that matches it.

    ``name_of(key)`` prepares a key before the rules (e.g. drops a prefix); ``value_of(name,
    key, value)`` re-lays out a tensor.  A key no rule matches is kept as ``<layout>key``, so
    that the conversion reports it as unexpected by its own name.  The MLP of timm's
    ``conv_mlp`` variants (1x1 convolutions) becomes linear weights, and GRN parameters take
    the official ``(1, 1, 1, C)`` shape.
    """
    out = {}
    for key, value in state_dict.items():
        name = name_of(key) if name_of else key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, name)
            if n:
                name = new
                break
        else:
            name = f"<{layout}>{key}"  # kept so it is reported as unexpected, by its own name
        if value_of is not None:
            value = value_of(name, key, value)
        # timm's conv_mlp variants store the MLP as 1x1 convolutions.
        if re.search(r"\.pwconv[12]\.weight$", name) and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        if re.search(r"\.grn\.(gamma|beta)$", name) and value.ndim != 4:
            value = value.reshape(1, 1, 1, -1)  # timm: (C,); FCMAE: (1, C)
        out[name] = value
    return out
