"""A job that fails on the server: one readable line (the exception's type and message), the whole traceback
under --debug.

NDIF answers a request that raised with the whole formatted server traceback as the job's
description; `tests/fake_ndif.py` does the same. The first line of that text is always
"Traceback (most recent call last):", which says nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_ndif import FakeNDIF, server_traceback, status_json

from codi_nnsight.model.inference import generate
from codi_nnsight.model.remote import RemoteUnavailable, remote_errors, server_exception, trace_kwargs

ROOT = Path(__file__).resolve().parents[1]
HINT = "--debug shows the server's traceback"


def _raised(e: BaseException) -> str:
    """The traceback text of `e` as a server formats it (raised here so it has frames)."""
    try:
        raise e
    except BaseException as caught:  # noqa: BLE001 - formatted, not handled
        return server_traceback(caught)


def test_server_exception_is_the_last_exception_of_the_traceback():
    simple = _raised(RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn"))
    assert simple.startswith("Traceback (most recent call last):\n  File ")
    assert server_exception(simple) == (
        "RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn"
    )
    try:
        try:
            {}["w"]
        except KeyError as inner:
            raise ValueError("first line\n  second line") from inner
    except ValueError as outer:
        chained = server_traceback(outer)
    assert "KeyError" in chained and "The above exception was the direct cause" in chained
    assert server_exception(chained) == "ValueError: first line second line"  # the one raised, on one line
    assert server_exception("TypeError: not a traceback") is None
    assert server_exception("") is None


def test_a_server_side_exception_is_one_line_naming_it(tiny_models, caplog):
    model = tiny_models["gpt2"]
    with FakeNDIF(model=model) as server:
        with caplog.at_level(logging.DEBUG, logger="codi_nnsight.model.remote"):
            with pytest.raises(RemoteUnavailable) as e:
                with remote_errors(server.url):
                    with model.trace(**model.prepare(["What is 2?"], max_new_tokens=0), **trace_kwargs(server.url)):
                        model.layers[0].output[0][:, :, 10**6]  # an index the server's tensor does not have
    assert str(e.value) == (
        f"remote {server.url}: request failed on the server "
        f"(IndexError: too many indices for tensor of dimension 2); {HINT}"
    )
    full = e.value.server_traceback
    assert full.startswith("Traceback (most recent call last):\n") and full.count("\n  File ") >= 2
    assert full.endswith("IndexError: too many indices for tensor of dimension 2")
    logged = [r.getMessage() for r in caplog.records if "the server's traceback" in r.getMessage()]
    assert len(logged) == 1 and logged[0].endswith(full)


def test_other_errors_keep_their_one_line(tiny_models):
    frames = [status_json("ERROR", description="Your job was cancelled or preempted by the server.")]
    with FakeNDIF("frames", frames=frames) as server:
        with pytest.raises(RemoteUnavailable) as e:
            generate(tiny_models["gpt2"], ["What is 2?"], 2, remote=server.url)
    assert str(e.value) == (
        f"remote {server.url}: request failed (RemoteError: Your job was cancelled or preempted by the server.)"
    )
    assert e.value.server_traceback == ""


@pytest.fixture(scope="module")
def three_layer_client(tmp_path_factory) -> str:
    """A tiny GPT-2 codi.json with one block more than the server's: its fingerprint names a parameter
    the server does not have, so the server's first request raises KeyError there."""
    from codi_nnsight.testing.tiny import write_tiny_codi

    return str(write_tiny_codi(tmp_path_factory.mktemp("tiny-3"), family="gpt2", n_layers=3, num_latent=3, seed=1))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "codi_nnsight", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_shows_the_last_line_and_the_whole_traceback_under_debug(tiny_dirs, three_layer_client, tmp_path):
    # A server deployed with a 2-block model, a client whose codi.json has 3: the request names
    # block 2, which the server cannot resolve, and the job raises there.
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    args = ["patch", "--model", three_layer_client, "--limit", "1", "--out", str(tmp_path / "r.nc")]
    failed = "request failed on the server (nnsight.intervention.serialization.UnknownPersistentIdError: "
    with FakeNDIF(checkpoint=tiny_dirs["gpt2"]) as server:
        plain = CliRunner().invoke(main, [*args, "--remote", server.url])
        # --debug sets up logging in a fresh process only (pytest owns this one's): run it as a user would.
        debug = _cli("--debug", *args, "--remote", server.url)
    assert plain.exit_code == 2, plain.output
    lines = [line for line in plain.output.splitlines() if line.strip()]
    assert lines == [f"error: remote {server.url}: {failed}Module:model.lm.transformer.h.2); {HINT}"]
    assert debug.returncode != 0
    # The server's traceback, every frame of it, then the client's own traceback of the error.
    at = debug.stderr.index("the server's traceback:\nTraceback (most recent call last):\n")
    server_part = debug.stderr[at:]
    assert server_part.count('\n  File "') >= 2
    assert "\nnnsight.intervention.serialization.UnknownPersistentIdError: Module:model.lm.transformer.h.2\n" in (
        server_part
    )
    assert f"{failed}Module:model.lm.transformer.h.2); {HINT}" in server_part
