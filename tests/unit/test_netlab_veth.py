"""netlab.veth without privileges: argument checks (before anything touches the kernel) and the loss
classifier's encoding."""

from __future__ import annotations

import struct

import pytest

from dwcp import netlab
from dwcp.errors import ConfigError
from dwcp.netlab._veth import loss_program


@pytest.mark.parametrize("kw", [{"loss": 1.0}, {"loss": -0.1}, {"rate_mbit": 0}, {"mtu": 100},
                                {"subnet": "10.0.0.0/24"}, {"name": "Bad Name"}])
def test_bad_arguments_are_config_errors(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        netlab.veth(**kw)  # type: ignore[arg-type]


def test_loss_program_threshold_and_shape() -> None:
    code = loss_program(0.001)
    assert len(code) == 7 * 8
    insns = [struct.unpack_from("<BBhi", code, i * 8) for i in range(7)]
    assert insns[0] == (0x85, 0, 0, 7)                 # call bpf_get_prandom_u32
    assert insns[1] == (0x94, 0, 0, 1_000_000)         # w0 %= 10^6
    assert insns[2] == (0xA5, 0, 2, 1000)              # if r0 < 1000 (0.1 %) goto drop
    assert insns[3][3] == 0 and insns[5][3] == 2       # TC_ACT_OK / TC_ACT_SHOT
    assert insns[4][0] == insns[6][0] == 0x95          # exit
    assert struct.unpack_from("<i", loss_program(0.0), 2 * 8 + 4)[0] == 0
