"""A CPU-only model actor for a self-hosted NDIF server (ndif 0.1.x) on loopback.

NDIF's stock `ModelActor` loads every model onto a CUDA device (`device=<gpu id>`,
`torch.cuda.synchronize()`, a placement check against the assigned GPUs), so on a
machine without a GPU it cannot load anything. This subclass keeps everything the
stock actor does for a request (deserialize, run, respond, upload) and changes only
where the weights live: on the CPU, in the dtype the deployment names; and it computes on one
CPU thread, as a local one-thread run does.

Used by `scripts/ndif_local.sh` (it puts this folder on the Ray workers' PYTHONPATH
and names `ndif_cpu_actor.CPUModelActor` as the controller's model actor class).
Not part of the `codi_nnsight` package: it imports `ndif`, which only the server needs.
"""

from __future__ import annotations

import gc

import ray
import torch
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.mixins.remotable import Remotable


class _CPUModelDeployment(BaseModelDeployment):
    # Parking (HOT->WARM) moves weights GPU->CPU; they are on the CPU already.
    CACHEABLE = False

    def load_from_disk(self):
        # One intra-op thread, as a local run with torch.set_num_threads(1): the same reduction
        # order, so remote and local results are bit-identical (tests/test_ndif.py checks it).
        # Set here, not left to OMP_NUM_THREADS in whatever environment Ray hands the worker.
        torch.set_num_threads(1)
        kwargs = {k: v for k, v in self.kwargs.items() if k != "trust_remote_code"}
        model = Remotable.from_model_key(self.model_key, dtype=self.dtype_name, device="cpu", **kwargs)
        model._module.requires_grad_(False)
        return model

    async def to_cache(self) -> None:  # never parked (CACHEABLE = False)
        return None

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


# num_cpus=0: the loopback Ray head advertises few CPUs and the controller holds one.
CPUModelActor = ray.remote(num_cpus=0, max_restarts=-1)(_CPUModelDeployment)
