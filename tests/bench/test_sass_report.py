"""bench/sass_report.py's reading of disassembled SASS (no compile: a fixed listing)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import sass_report  # noqa: E402

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.EF.64 R2, desc[UR4][R4.64] ;
        /*0020*/                   LOP3.LUT R6, R2, 0x4b000000, R7, 0xec, !PT ;
        /*0030*/                   FADD R6, R6, -8388616 ;
        /*0040*/                   FFMA R8, R9, R6, R8 ;
        /*0050*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   BRA `(.L_x_1);
        /*0080*/                   EXIT ;
"""


def test_the_hot_loop_is_the_longest_backward_branch_and_its_opcodes_are_counted() -> None:
    loop = sass_report.hot_loop(LISTING)
    assert loop[0] == ".L_x_0:" and "BRA `(.L_x_0)" in loop[-1]
    counts = sass_report.opcodes(loop)
    assert counts == {"LDG": 1, "LOP3": 1, "FADD": 1, "FFMA": 1, "BRA": 1}


def test_a_listing_without_a_loop_is_counted_whole() -> None:
    flat = "\n".join(line for line in LISTING.splitlines() if "BRA" not in line)
    assert sass_report.opcodes(sass_report.hot_loop(flat))["BAR"] == 1
