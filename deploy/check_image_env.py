"""Build-time guard for the images: the serving environment has no torch and exactly one ONNX Runtime.

Usage: ``python check_image_env.py onnxruntime|onnxruntime-gpu``. The two ONNX Runtime distributions install
the same ``onnxruntime`` module, so having both silently picks one; torch would mean the lean serving install
pulled in training dependencies. Exits 1 with the reason on stderr; standard library only.
"""

from __future__ import annotations

import sys
from importlib import metadata

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
FORBIDDEN = ("torch", "torchvision", "torchattacks")


def installed() -> set[str]:
    """Normalised names of every installed distribution."""
    names = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            names.add(name.lower().replace("_", "-"))
    return names


def main(argv: list[str]) -> int:
    """Return 0 when the environment holds exactly ``argv[0]`` of the ONNX Runtimes and nothing forbidden."""
    if len(argv) != 1 or argv[0] not in ORT_DISTRIBUTIONS:
        sys.stderr.write(f"usage: check_image_env.py {{{'|'.join(ORT_DISTRIBUTIONS)}}}, got {argv}\n")
        return 2
    names = installed()
    problems = [f"{name} is installed, the serving image must not contain it" for name in FORBIDDEN if name in names]
    ort = sorted(n for n in ORT_DISTRIBUTIONS if n in names)
    if ort != [argv[0]]:
        problems.append(f"ONNX Runtime distributions installed: {ort}, expected exactly [{argv[0]!r}]")
    for problem in problems:
        sys.stderr.write(problem + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
