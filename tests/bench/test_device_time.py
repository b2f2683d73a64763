"""bench/device_time.py: GPU busy time from a profiler trace (an XSpace built here)."""

import pytest
from jax.profiler import ProfileData

from tandem.bench.device_time import busy_ns, kernel_intervals

XSPACE = """
planes {
  name: "/device:GPU:0"
  lines {
    name: "Stream #14(Compute)"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 9000000 duration_ps: 2000000 }
  }
  lines {
    name: "Stream #15(MemcpyD2D)"
    timestamp_ns: 1000
    events { metadata_id: 2 offset_ps: 4000000 duration_ps: 3000000 }
  }
  lines {
    name: "XLA Ops"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 50000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "entry_mosaic_gpu_kernel" } }
  event_metadata { key: 2 value { id: 2 name: "loop_convert_fusion" } }
}
planes { name: "/host:CPU" }
"""


def test_busy_time_is_the_union_of_the_stream_kernels():
    data = ProfileData.from_text_proto(XSPACE)
    intervals = kernel_intervals(data)
    # The "XLA Ops" line repeats the kernels as ops: it must not be counted.
    assert intervals == [(1000, 6000), (5000, 8000), (10000, 12000)]
    # [1000, 8000) merged from two overlapping kernels, then [10000, 12000); the gap
    # between them (the GPU waiting for the host) is not busy time.
    assert busy_ns(intervals) == 7000 + 2000


def test_a_profile_without_the_device_names_what_it_has():
    data = ProfileData.from_text_proto('planes { name: "/host:CPU" }')
    with pytest.raises(ValueError, match="no plane '/device:GPU:0'.*/host:CPU"):
        kernel_intervals(data)
