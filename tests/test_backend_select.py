"""Which triton releases cuda-triton and its Gluon kernels accept, and how they say no."""

from __future__ import annotations

import os

import pytest
import torch

from lorakit.backends import TRITON_MIN, triton_version_problem
from lorakit.errors import UsageError


@pytest.mark.parametrize("version", ["3.6.0", "3.6.1", "3.7.0", "4.0.0", "3.6.0+git1234abcd"])
def test_supported_triton_releases(version):
    assert triton_version_problem(version) is None


@pytest.mark.parametrize("version", ["3.5.1", "3.1.0", "2.3.0", "3.0.0+gitabcdef"])
def test_older_triton_releases_are_named(version):
    why = triton_version_problem(version)
    assert why is not None and version in why and ".".join(map(str, TRITON_MIN)) in why and "\n" not in why


def test_unreadable_triton_version():
    assert "cannot read the triton version 'nightly'" in triton_version_problem("nightly")


def test_backend_refuses_an_older_triton(monkeypatch):
    triton = pytest.importorskip("triton")
    from lorakit.backends.cuda_triton import CudaTritonBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("cuda-triton runs on CPU only under TRITON_INTERPRET=1")
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    with pytest.raises(UsageError, match=r"triton >= 3\.6, found 3\.1\.0"):
        CudaTritonBackend(device)


@pytest.mark.parametrize(
    ("version", "env", "enabled"),
    [
        ("3.6.0", "", True),  # the release the Gluon kernels are written for
        ("3.6.0+gitabc", "", True),
        ("3.7.0", "", False),  # Gluon's API changes between releases: off unless asked for
        ("3.5.0", "", False),
        ("nightly", "", False),  # an unreadable version: not the tested release
        ("3.7.0", "1", True),  # LORAKIT_GLUON=1 asks for them
        ("3.6.0", "0", False),  # LORAKIT_GLUON=0 switches them off
    ],
)
def test_gluon_kernels_only_on_their_triton(version, env, enabled):
    triton_util = pytest.importorskip("lorakit.kernels.triton_util")
    assert triton_util.gluon_enabled(version, env) is enabled


def test_auto_takes_cpu_torch_where_cuda_triton_cannot_run(monkeypatch):
    import lorakit.backends as backends
    from lorakit.backends.cpu_torch import CpuTorchBackend

    monkeypatch.setattr(backends, "cuda_triton_available", lambda: (False, "the kernels need triton >= 3.6"))
    assert isinstance(backends.get_backend("auto"), CpuTorchBackend)
    with pytest.raises(UsageError, match=r"--backend cuda-triton cannot run here: the kernels need triton >= 3\.6"):
        backends.get_backend("cuda-triton")
