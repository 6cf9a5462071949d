"""codi-nnsight: find where a continuous chain-of-thought (CODI) model reasons.

    from codi_nnsight import load_model, load_pairs, patch_sweep
    model = load_model()                       # the bundled toy CODI (or a codi.json / preset)
    ds = patch_sweep(model, load_pairs("data/demo_pairs.json"))
"""

__version__ = "0.1.0"

from .data.pairs import PairSet, load_pairs  # noqa: E402
from .errors import UserError  # noqa: E402
from .model.wrapper import CODIModel, load_model  # noqa: E402
from .patching.sweep import patch_sweep  # noqa: E402

__all__ = ["CODIModel", "PairSet", "UserError", "__version__", "load_model", "load_pairs", "patch_sweep"]
