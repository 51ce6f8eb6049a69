"""Compile every kernel instantiation to real cubins with NVRTC.

The options are those :mod:`arcface_ce._kernels` uses at run time plus the
architecture and the header folder, so register and shared-memory limits
(checked by ptxas) hold for the build the package really does.
"""

import pytest

from arcface_ce import _kernels

ARCHITECTURES = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def nvrtc():
    from arcface_ce import _nvrtc

    try:
        _nvrtc.load_library()
    except OSError as exc:
        pytest.skip(f"libnvrtc is not available: {exc}")
    return _nvrtc


def test_name_expressions_cover_every_dtype_pair():
    expressions = _kernels.name_expressions()
    pairs = len(_kernels.LOGITS_TYPES) * len(_kernels.LABEL_TYPES)
    assert len(expressions) == len(set(expressions))
    assert len(expressions) == len(_kernels.KERNELS) * pairs
    assert "mce_write<__nv_bfloat16, long long>" in expressions
    assert "mce_row_stats_chunk<double, int>" in expressions


def test_uint16_logits_are_bfloat16():
    assert _kernels.logits_type_name("uint16") == "bfloat16"
    with pytest.raises(TypeError, match="logits dtype"):
        _kernels.logits_type_name("int8")
    with pytest.raises(TypeError, match="label dtype"):
        _kernels.label_type_name("uint32")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_instantiation_compiles_to_cubin(nvrtc, arch):
    options = [
        *_kernels.compile_options(),
        f"--gpu-architecture={arch}",
        *(f"-I{path}" for path in nvrtc.include_dirs()),
    ]
    expressions = _kernels.name_expressions()
    result = nvrtc.compile_program(
        _kernels.kernel_source(), _kernels.SOURCE_FILE, options, expressions
    )
    # A real-architecture build is an ELF cubin, not PTX text.
    assert result.cubin[:4] == b"\x7fELF", result.cubin[:16]
    assert result.log.strip() == "", result.log
    assert sorted(result.lowered_names) == sorted(expressions)
    for expr, lowered in result.lowered_names.items():
        kernel = expr.split("<", 1)[0]
        assert lowered.startswith("_Z") and kernel in lowered, (expr, lowered)
        assert lowered.encode() in result.cubin, (expr, lowered)


def test_compile_error_is_reported(nvrtc):
    with pytest.raises(nvrtc.NVRTCError, match="undefined_symbol_xyz"):
        nvrtc.compile_program(
            "__global__ void k() { undefined_symbol_xyz(); }",
            "bad.cu",
            ["--gpu-architecture=sm_80"],
        )
