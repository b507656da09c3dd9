"""options.py: option values as str-Enums that behave as their strings, one stage bound, and
granularity as one typed value with its three spellings converted in one place."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fairy2i_compile.compiler import config
from fairy2i_compile.quantization import quant
from fairy2i_compile.compiler.codegen.triton_spec import KernelSpec
from fairy2i_compile.compiler.options import (
    MAX_STAGES,
    Compiler,
    KernelName,
    Method,
    Mode,
    OptionValue,
    ScaleGranularity,
    ScaleKind,
    Strategy,
    check_stages,
    group_size_of_packed,
    packed_group_size,
)
from fairy2i_compile.compiler.ops.quantize import decode_granularity, encode_granularity

ENUMS = [Mode, Method, Compiler, KernelName, ScaleKind, Strategy]


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_members_behave_as_their_strings(enum):
    for member in enum:
        value = member.value
        assert type(value) is str and member == value and isinstance(member, str)
        assert {value: 1}[member] == 1 and {member: 1}[value] == 1  # hashes as the string
        assert json.dumps([member]) == json.dumps([value]) and repr(member) == repr(value)
        assert f"{member}" == str(member) == value and type(str(member)) is str
        assert enum.parse(value, "x") is member


def test_parse_names_the_option_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"option 'mode' must be one of \['exact', 'ptq', 'qat', 'calibrate'\], "
                                         r"got 'train'"):
        Mode.parse("train", "option 'mode'")
    with pytest.raises(ValueError, match=r"got 3"):
        Method.parse(3, "method")


def test_the_option_tuples_are_the_enums():
    assert config.MODES == Mode.values() == ("exact", "ptq", "qat", "calibrate")
    assert config.METHODS == quant.METHODS == ("phase", "binary", "ternary")
    assert config.COMPILERS == ("eager", "inductor") and config.GRANULARITIES == ("tensor", "row")
    cfg = config.Fairy2iConfig(mode="qat", method="binary", compiler="inductor")
    assert (cfg.mode, cfg.method, cfg.compiler) == (Mode.QAT, Method.BINARY, Compiler.INDUCTOR)
    assert json.loads(json.dumps(cfg.to_dict()))["mode"] == "qat"
    assert issubclass(Mode, OptionValue)


@pytest.mark.parametrize("bad", [0, MAX_STAGES + 1, -1, True, 2.0, "2", None])
def test_one_stage_bound_for_the_config_the_quantizer_and_the_kernels(bad):
    with pytest.raises(ValueError, match=rf"option 'stages' must be (an int )?in 1..{MAX_STAGES}"):
        config.Fairy2iConfig(stages=bad)
    with pytest.raises(ValueError, match=rf"stages must be (an int )?in 1..{MAX_STAGES}"):
        quant.phase_quant(torch.ones(2, 2), torch.ones(2, 2), bad)
    with pytest.raises(ValueError, match=rf"KernelSpec.stages must be (an int )?in 1..{MAX_STAGES}"):
        KernelSpec(path="mma", stages=bad, scale="tensor")
    assert [check_stages(t) for t in range(1, MAX_STAGES + 1)] == list(range(1, MAX_STAGES + 1))


@given(g=st.one_of(st.sampled_from(["tensor", "row"]), st.integers(1, 1 << 20)))
def test_granularity_spellings_round_trip(g):
    typed = ScaleGranularity.of(g)
    assert typed.option == g and ScaleGranularity.of(typed) is typed
    assert ScaleGranularity.from_op_arg(typed.op_arg()) == typed
    assert encode_granularity(g) == typed.op_arg() and decode_granularity(encode_granularity(g)) == g
    assert group_size_of_packed(typed.packed_group_size) == typed.group_size
    assert packed_group_size(typed.group_size) == typed.packed_group_size == (g if isinstance(g, int) else 0)
    assert config.Fairy2iConfig(scale_granularity=typed).scale_granularity == g  # the config holds the option value


@pytest.mark.parametrize("bad, match", [
    ("col", r"unknown granularity 'col': use 'tensor', 'row', or a positive int group size"),
    ("64", r"unknown granularity '64'"),  # digits are the op argument's spelling, not an option value
    ("group", r"unknown granularity 'group'"),
    (0, r"group size must be >= 1, got granularity=0; use e.g. 64 or 128"),
    (True, r"granularity must be 'tensor', 'row' or a positive int group size, got True of type bool"),
    (2.0, r"got 2.0 of type float"),
])
def test_a_bad_granularity_is_refused_with_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        ScaleGranularity.of(bad)
    with pytest.raises(ValueError, match=r"option 'scale_granularity' must be one of \('tensor', 'row'\)"):
        config.Fairy2iConfig(scale_granularity=bad)


def test_a_typed_granularity_is_checked_when_built():
    with pytest.raises(ValueError, match=r"group size must be an int >= 1, got group_size=0"):
        ScaleGranularity(ScaleKind.GROUP, 0)
    with pytest.raises(ValueError, match=r"granularity 'row' has no group size, got group_size=8"):
        ScaleGranularity("row", 8)


def test_the_quantizer_takes_the_typed_granularity():
    re, im = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)).chunk(2, dim=0)
    for g in ("tensor", "row", 4):
        a = quant.phase_quant(re, im, 2, g)
        b = quant.phase_quant(re, im, 2, ScaleGranularity.of(g))
        assert torch.equal(a.re, b.re) and torch.equal(a.s_re, b.s_re) and a.group_size == b.group_size
        assert quant.scale_groups(4, 10, g) == quant.scale_groups(4, 10, ScaleGranularity.of(g))


@pytest.mark.parametrize("value, on, off_by_default", [
    ("0", False, False), ("off", False, False), (" False ", False, False), ("NO", False, False),
    ("1", True, True), ("on", True, True), (" Yes", True, True), ("TRUE", True, True),
    ("", True, False), ("maybe", True, False), (None, True, False)])
def test_env_switch_reads_the_on_and_off_words(monkeypatch, value, on, off_by_default):
    from fairy2i_compile.compiler.options import env_switch

    if value is None:
        monkeypatch.delenv("FAIRY2I_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("FAIRY2I_TEST_SWITCH", value)
    assert env_switch("FAIRY2I_TEST_SWITCH") is on
    assert env_switch("FAIRY2I_TEST_SWITCH", default=False) is off_by_default
