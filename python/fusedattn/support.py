"""What each backend serves, read from the backends' own declarations (so it stays true).

``python -m fusedattn.support`` prints the README's support matrix as a Markdown table;
``support_matrix()`` returns the rows. A modifier a backend does not declare is not an error
under ``backend="auto"``: the call goes to the next backend that declares it (in the end the
reference), which ``fusedattn.resolve_backend`` reports.
"""
from __future__ import annotations

import torch

from . import backends
from .spec import MODIFIERS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def support_matrix() -> list[dict]:
    """One row per registered backend: devices, dtypes, scores, modifiers (``varlen`` is served by
    every backend, per sequence where the kernels do not declare it: the row's ``varlen`` says which),
    max head dim, and whether it is usable in this process (``None``) or why not."""
    rows = []
    for name in backends.names():
        b = backends.get(name)
        if b is None:
            rows.append({"backend": name, "available": backends.unavailable_reason(name)})
            continue
        rows.append({
            "backend": name,
            "devices": sorted(b.devices),
            "dtypes": [_SHORT[d] for d in _DTYPES if d in b.dtypes],
            "scores": sorted(b.scores),
            "modifiers": [m for m in MODIFIERS if m in b.serves()],
            # a packed batch in one kernel call, or one call per sequence (Backend.forward)
            "varlen": "one call" if "varlen" in b.modifiers else "per sequence",
            "max_head_dim": b.max_head_dim if b.max_head_dim < (1 << 30) else None,
            "available": b.unavailable_reason(),
        })
    return rows


def markdown() -> str:
    yes = lambda ok: "yes" if ok else "–"  # noqa: E731
    head = ["backend", "devices", *(_SHORT[d] for d in _DTYPES), "scores", *MODIFIERS, "max head dim",
            "usable here"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in support_matrix():
        if "devices" not in r:
            unknown = " | ".join(["?"] * (len(head) - 2))
            lines.append(f"| {r['backend']} | {unknown} | {r['available']} |")
            continue
        here = "yes" if r["available"] is None else f"no: {r['available']}"
        cells = [r["backend"], ", ".join(r["devices"]), *(yes(_SHORT[d] in r["dtypes"]) for d in _DTYPES),
                 ", ".join(r["scores"]),
                 *(r["varlen"] if m == "varlen" else yes(m in r["modifiers"]) for m in MODIFIERS),
                 str(r["max_head_dim"] or "any"), here]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
