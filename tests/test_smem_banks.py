"""perf/smem_banks.py: shared-memory wavefronts counted from PTX, on hand-written PTX whose costs are known."""

from __future__ import annotations

from perf import smem_banks

PROLOGUE = """
    mov.u32 %r1, %tid.x;
    mov.b32 %r2, global_smem;
"""


def _count(body: str, num_warps: int = 1) -> smem_banks.Wavefronts:
    return smem_banks.count(PROLOGUE + body, num_warps)


def test_consecutive_words_take_one_wavefront():
    waves = _count("""
    shl.b32 %r3, %r1, 2;
    add.s32 %r4, %r2, %r3;
    ld.shared.f32 %f1, [%r4];
    """)
    assert waves == smem_banks.Wavefronts(loads=1, loads_ideal=1, stores=0, stores_ideal=0, unknown=0)
    assert (waves.matrix_loads, waves.matrix_loads_ideal) == (0, 0)


def test_a_column_of_a_row_major_tile_meets_one_bank():
    """Lane i reads row i of a 512-float row-major tile (2,048 bytes apart): 32 words in bank 0, 32 wavefronts; as
    16-byte vectors, 8 a quarter warp. The float32 forward's held weights before they were transposed."""
    scalar = _count("""
    shl.b32 %r3, %r1, 11;
    add.s32 %r4, %r2, %r3;
    ld.shared.f32 %f1, [%r4+16];
    """)
    assert (scalar.loads, scalar.loads_ideal) == (32, 1)
    vector = _count("""
    shl.b32 %r3, %r1, 11;
    add.s32 %r4, %r2, %r3;
    ld.shared.v4.b32 {%r5, %r6, %r7, %r8}, [%r4];
    """)
    assert (vector.loads, vector.loads_ideal) == (32, 4)


def test_broadcast_and_stores_and_several_warps():
    """Every lane of a warp reads one word (a broadcast: one wavefront); stores count apart; each warp's lanes
    have their own tid.x."""
    waves = _count(
        """
    shr.u32 %r3, %r1, 5;
    shl.b32 %r3, %r3, 2;
    add.s32 %r4, %r2, %r3;
    ld.shared.b32 %r5, [%r4];
    shl.b32 %r6, %r1, 3;
    add.s32 %r7, %r2, %r6;
    st.shared.v2.b32 [%r7], {%r5, %r5};
    """,
        num_warps=2,
    )
    assert waves == smem_banks.Wavefronts(loads=2, loads_ideal=2, stores=4, stores_ideal=4, unknown=0)


def test_ldmatrix_rows_and_swizzle():
    """ldmatrix.x4: 32 row addresses of 16 bytes, 8 a matrix. Rows 128 bytes apart meet in the same 4 banks (8 a
    matrix: 32 wavefronts); XOR-swizzled by the row (Triton's swizzled layouts), conflict-free (4)."""
    plain = _count("""
    shl.b32 %r3, %r1, 7;
    add.s32 %r4, %r2, %r3;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r5, %r6, %r7, %r8}, [%r4];
    """)
    assert (plain.loads, plain.loads_ideal) == (32, 4)
    assert (plain.matrix_loads, plain.matrix_loads_ideal) == (32, 4)
    swizzled = _count("""
    and.b32 %r9, %r1, 7;
    shl.b32 %r10, %r9, 4;
    shl.b32 %r3, %r1, 7;
    xor.b32 %r11, %r3, %r10;
    add.s32 %r4, %r2, %r11;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r5, %r6, %r7, %r8}, [%r4];
    """)
    assert (swizzled.loads, swizzled.loads_ideal) == (4, 4)


def test_signed_bit_field_negation_and_unknown_addresses():
    """bfe.s32 sign-extends its field (Triton's swizzles use it), neg negates; an address from a loaded value is
    unknown, counted apart."""
    waves = _count("""
    bfe.s32 %r3, %r1, 0, 1;
    neg.s32 %r4, %r3;
    and.b32 %r5, %r3, 4;
    add.s32 %r6, %r5, %r4;
    add.s32 %r7, %r2, %r6;
    ld.shared.b8 %rs1, [%r7];
    ld.shared.u32 %r8, [%r7];
    add.s32 %r9, %r2, %r8;
    ld.shared.f32 %f1, [%r9];
    """)
    # odd lanes: bfe -1, neg 1, and 4: byte 5 (word 1); even lanes: byte 0 (word 0): two words, two banks
    assert (waves.loads, waves.loads_ideal, waves.unknown) == (2, 2, 1)


def test_an_access_with_its_scope_is_counted():
    """Triton 3.8 writes shared-memory stores with the state space's scope (st.shared::cta): they count as the
    unscoped ones (uncounted before, its kernels showed no stores at all)."""
    body = """
    shl.b32 %r3, %r1, 4;
    add.s32 %r4, %r2, %r3;
    st.shared{scope}.v4.b32 [%r4], {{%r5, %r5, %r5, %r5}};
    ld.shared{scope}.b32 %r6, [%r4];
    """
    scoped, plain = _count(body.format(scope="::cta")), _count(body.format(scope=""))
    assert scoped == plain == smem_banks.Wavefronts(loads=4, loads_ideal=1, stores=4, stores_ideal=4, unknown=0)
