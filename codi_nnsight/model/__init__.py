"""The CODI model: its description, checkpoint loading, the plain module, the nnsight wrapper.

`config` (the `codi.json`), `module` (the CODI procedure as one `torch.nn.Module`),
`wrapper` (`CODIModel`, the nnsight `Remotable`), `inference` (greedy answers), `remote`
(running traces on NDIF).
"""

from .config import CODIConfig, resolve_model_spec
from .wrapper import CODIModel, load_model

__all__ = ["CODIConfig", "CODIModel", "load_model", "resolve_model_spec"]
