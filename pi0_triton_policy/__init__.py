"""pi0-triton-policy: OpenPI's Pi0 policy on fused Triton kernels, behind OpenPI's websocket protocol."""

import os as _os

# `kernels/` lives at the repository root and is installed as `pi0_triton_policy.kernels` (pyproject's
# package-dir). When the package is used straight from a source checkout (PYTHONPATH=., no install, as on
# a bare GPU machine), let the subpackage resolve from the root as well.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)
