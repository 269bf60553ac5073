"""Grid-wide barrier for persistent kernels.

Every program must be resident at once (the host caps the grid and launches cooperatively);
under the Triton interpreter the persistent kernels run with a single program, for which the
barrier passes at once.
"""

import triton
import triton.language as tl


@triton.jit
def grid_barrier(counter, target):
    """Wait until ``target`` arrivals have been counted on ``counter`` (an int32 in global memory).

    The caller passes ``target = num_programs * (number of barriers so far, this one included)``,
    so one zeroed counter serves all the barriers of a launch.
    """
    # Order this program's global stores (made by all its threads) before the release.
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < target:
        pass
    # The acquire above is made by one thread; make it visible to the whole program.
    tl.debug_barrier()
