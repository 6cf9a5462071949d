"""`tests/fake_ndif.py` runs requests the way a real NDIF model actor does, where that changes what a client sees."""

from __future__ import annotations

import nnsight
import torch
from fake_ndif import FakeNDIF

from codi_nnsight.model.remote import remote_errors, trace_kwargs


def test_requests_run_frozen_on_one_thread_and_the_shared_model_is_put_back(tiny_models):
    model = tiny_models["gpt2"]
    model._module.requires_grad_(True)  # loaded frozen (as NDIF's are): unfreeze, to see the host freeze it
    flags = [p.requires_grad for p in model._module.parameters()]
    assert any(flags)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # this process on two threads; the server must still run on one
    try:
        with FakeNDIF(model=model, threads=1) as server:
            with remote_errors(server.url):
                with model.trace(**model.prepare(["What is 2?"], max_new_tokens=0), **trace_kwargs(server.url)):
                    grads = nnsight.save([p.requires_grad for p in model.codi.parameters()])
                    on = nnsight.save(torch.get_num_threads())
        assert torch.get_num_threads() == 2  # put back after the request
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == len(flags) and not any(grads)  # frozen, as ndif's actor leaves them
    assert on == 1
    assert [p.requires_grad for p in model._module.parameters()] == flags  # this process's model is as before
    model._module.requires_grad_(False)  # the shared session model, as loaded


def test_a_deployed_checkpoint_is_the_servers_own_frozen_copy(tiny_dirs, tiny_models):
    with FakeNDIF(checkpoint=tiny_dirs["gpt2"], dtype="bfloat16") as server:
        deployed = server.model
    assert deployed is not tiny_models["gpt2"]
    assert {p.dtype for p in deployed._module.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in deployed._module.parameters())
