"""The installed package matches how it was built (CI builds with CODETR_CUDA=1)."""
import os

import pytest
import torch

import codetr


def test_extension_loaded_unless_pure_python_install():
    info = codetr.ops.extension_info()
    if os.environ.get("CODETR_BUILD_EXT") == "0":
        assert not info["extension_loaded"]
    else:
        assert info["extension_loaded"], info["load_error"]
        assert all(entry["cpu"] == "compiled" for entry in info["ops"].values()), info


@pytest.mark.skipif(os.environ.get("CODETR_CUDA") != "1",
                    reason="checks a CODETR_CUDA=1 build (as CI makes); this one may be CPU-only")
def test_cuda_kernels_registered_when_built_with_cuda():
    info = codetr.ops.extension_info()
    assert info["cuda_kernels_built"], info
    for op in info["ops"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"codetr::{op}", "CUDA"), op


def test_cli_env_runs(capsys):
    from codetr.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "ms_deform_attn" in out and "compiled extension" in out
