"""The batch policy of the run layer: how many pairs go into one trace, by where it runs.

Locally the budget is memory (free CUDA memory, or a fixed CPU budget) with the shared prefill
caches counted once per question; on a server, whose memory is not ours to measure, a row budget
per request.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .backend import resolve_backend

log = logging.getLogger(__name__)


#: Rows per request when a remote server runs the sweep: its memory is not ours to measure, and
#: fewer, larger requests spend less time queueing (a request of this many rows returns well under 1 MB).
REMOTE_ROWS = 1024


def auto_batch_size(model: Any, rows_per_pair: int, prompt_len: int, remote: Any = False) -> int:
    """Pairs per trace: from free memory (CUDA), a memory and row budget (CPU), or a row budget (remote).

    Rows that continue a question share its prefill cache, so a pair costs two prompts' caches plus
    each row's own latent, suffix and decoded tokens — not a full cache per row.
    """
    if resolve_backend(remote).is_server:
        n = max(1, REMOTE_ROWS // rows_per_pair)
        log.info("--batch-size auto with a remote server: %d pairs (%d rows) per request", n, n * rows_per_pair)
        return n
    cfg = model.codi.lm.config
    d = cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_token = 2 * model.n_layers * kv_heads * (d // cfg.num_attention_heads) * (torch.finfo(model.dtype).bits // 8)
    own = model.num_latent + 32  # latents, [eot] + prompt, candidates, decoded tokens
    elem = torch.finfo(model.dtype).bits // 8
    per_pair = kv_token * (2 * prompt_len + rows_per_pair * own) + rows_per_pair * (
        4 * cfg.vocab_size * 8 + 16 * d * own * elem
    )
    dev = model.device
    if dev is not None and dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, int(free * 0.6 // per_pair))
    return max(1, min(512 // rows_per_pair, int(2e9 // per_pair)))
