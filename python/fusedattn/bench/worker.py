"""Run one benchmark case in a fresh interpreter: JSON in on stdin, one JSON line out on stdout.

``{"spec": {...Case fields, "pass": ...}, "repeats": N, "budget_s": s, "threads": T}`` ->
the measured fields of ``harness.run_case``, or ``{"error": ...}``.
"""
import json
import sys

from .harness import run_case


def main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        res = run_case(job["spec"], job["repeats"], job["budget_s"], job["threads"])
    except Exception as e:  # noqa: BLE001 - the parent records it as the reason
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
