"""The readers of XLA's TPU output (benchmarks/tpu/), on hand-written dumps: no compiler."""

import pytest

from benchmarks.tpu import collectives
from benchmarks.tpu import memory
from benchmarks.tpu import roofline
from benchmarks.tpu import shapes

GIB = 2 ** 30
MIB = 2 ** 20


# ---- shapes ----------------------------------------------------------------------------


def test_array_bytes_of_each_array_in_a_shape():
  assert shapes.array_bytes("bf16[8,16]{1,0}") == [256]
  assert shapes.array_bytes("(f32[8]{0}, s4[6]{0}, u32[], pred[3])") == [32, 3, 4, 3]
  assert shapes.array_bytes("token[]") == []


def test_value_bytes_of_a_tuple_element_and_of_the_tuple_itself():
  tuple_shape = "(f32[512,1024]{1,0}, bf16[8]{0})"
  assert shapes.value_bytes(tuple_shape, "{0}") == (2 * MIB, "f32[512,1024]")
  assert shapes.value_bytes(tuple_shape, "{1}") == (16, "bf16[8]")
  assert shapes.value_bytes(tuple_shape, "{}") == (0, "")  # pointers only
  assert shapes.value_bytes("s32[4,4]{1,0}", "{}") == (64, "s32[4,4]")


# ---- collectives ---------------------------------------------------------------------

HLO_LINES = """
  %all-reduce.1 = (f32[8]{0}, bf16[4,2]{1,0}) all-reduce(%a, %b), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %all-gather-start.2 = (bf16[2,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(%c), replica_groups=[2,4]<=[8], dimensions={0}
  %all-gather-done.2 = bf16[8,16]{1,0} all-gather-done(%all-gather-start.2)
  %reduce-scatter.3 = f32[4]{0} reduce-scatter(%d), replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  ROOT %collective-permute-start.4 = (f32[2]{0}, f32[2]{0}, u32[], u32[]) collective-permute-start(%e), source_target_pairs={{0,1}}
"""


def test_collective_bytes_from_hlo_text():
  got = collectives.collectives(HLO_LINES, 8)
  assert got["all-reduce"] == {"count": 1, "result_bytes": 48, "sent_bytes": 2 * 3 / 4 * 48}
  # The async pair counts once, with the gathered result.
  assert got["all-gather"] == {"count": 1, "result_bytes": 256, "sent_bytes": 3 / 4 * 256}
  assert got["reduce-scatter"] == {"count": 1, "result_bytes": 16, "sent_bytes": 16}
  assert got["collective-permute"] == {"count": 1, "result_bytes": 8, "sent_bytes": 8}


def test_replica_groups_in_every_spelling():
  assert collectives.group_size("replica_groups=mesh['data'=2,'model'=4] {'data','model'}",
                                8) == 8
  assert collectives.group_size("replica_groups=[4,2]<=[8]", 8) == 2
  assert collectives.group_size("replica_groups={{0,1,2},{3,4,5}}", 6) == 3
  assert collectives.group_size("to_apply=%add", 16) == 16  # no groups: every device


def test_a_collective_within_one_device_sends_nothing_and_counts_repeat():
  text = ("  %all-reduce.1 = f32[256]{0} all-reduce(%a), replica_groups={{0},{1}}\n"
          "  %all-reduce.2 = f32[256]{0} all-reduce(%b), replica_groups={{0,1}}\n"
          "  %all-to-all.3 = bf16[4,64]{1,0} all-to-all(%c), replica_groups={{0,1,2,3}}\n")
  got = collectives.collectives(text, 2)
  assert got["all-reduce"] == {"count": 2, "result_bytes": 2048, "sent_bytes": 1024}
  assert got["all-to-all"]["sent_bytes"] == 3 / 4 * 512


def test_transfers_between_slices_are_counted_apart():
  text = ('  %send.7 = (f32[1024]{0}, u32[]) send(%g, %token), channel_id=3, '
          'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}\n'
          '  %send.8 = (bf16[64]{0}, u32[]) send(%h, %token), channel_id=4, '
          'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}\n')
  got = collectives.collectives(text, 8)
  assert got == {"dcn-all-reduce": {"count": 2, "result_bytes": 4096 + 128,
                                    "sent_bytes": 4096 + 128}}


# ---- memory ----------------------------------------------------------------------------


def test_live_at_peak_reads_xla_live_ranges(tmp_path):
  """The moment of highest memory and what is live then, from an XLA-style dump."""
  (tmp_path / "module_0001.step.after_optimizations.txt").write_text(
      "ENTRY %main {\n"
      "  %a = f32[1024,1024]{1,0} parameter(0)\n"
      "  %b = bf16[1024,1024]{1,0} fusion(%a), kind=kLoop\n"
      "  %c = (f32[512,1024]{1,0}, f32[8]{0}) fusion(%b), kind=kLoop\n"
      "  ROOT %d = f32[1024,1024]{1,0} add(%a, %a)\n"
      "}\n")
  (tmp_path / "module_0001.step.after_optimizations-live-range.txt").write_text(
      "HloLiveRange (max 3):\n  InstructionSequence:\n    0:a\n    1:b\n    2:c\n    3:d\n"
      "  BufferLiveRange:\n    a{}:0-1\n    b{}:1-2\n    c{}:2-2\n    c{0}:2-3\n"
      "    c{1}:2-3\n    d{}:3-3\n")
  found = memory.live_at_peak(str(tmp_path))
  # At 1: a (4 MiB) + b (2 MiB); at 2: b + c{0} (2 MiB); at 3: c{0} + d (4 MiB) = 6 MiB too,
  # so the first moment of 6 MiB is the peak. c{1} (32 bytes) is under the 1 MiB cut.
  assert found["peak_gib"] == round(6 * MIB / GIB, 3)
  assert found["instruction"] == "b"
  assert found["values"] == [{"shape": "f32[1024,1024]", "count": 1, "mib": 4.0},
                             {"shape": "bf16[1024,1024]", "count": 1, "mib": 2.0}]
  # With no size cut the 32 bytes of c{1} count at 2 and 3: 6 MiB + 32 at 3 is the peak.
  assert memory.live_at_peak(str(tmp_path), min_bytes=0)["instruction"] == "d"
  assert memory.live_at_peak(str(tmp_path / "missing")) == {}


def test_live_at_peak_reads_the_last_module_of_the_dump(tmp_path):
  for number, shape in (("0001", "f32[1024,1024]"), ("0002", "bf16[2048,1024]")):
    (tmp_path / f"module_{number}.step.after_optimizations.txt").write_text(
        f"  ROOT %x = {shape}{{1,0}} parameter(0)\n")
    (tmp_path / f"module_{number}.step.after_optimizations-live-range.txt").write_text(
        "  InstructionSequence:\n    0:x\n  BufferLiveRange:\n    x{}:0-0\n")
  assert memory.live_at_peak(str(tmp_path))["values"] == [
      {"shape": "bf16[2048,1024]", "count": 1, "mib": 4.0}]


# The layout of XLA's *-memory-usage-report.txt (values made up).
MEMORY_REPORT = """\
Memory Space: default (color=0)
Total bytes: 2147549184 (2.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
     1.5GiB( 75%);     1.5GiB;            0;                1; 2\u00d7f32[64,12,198,198]
     1.5GiB( 75%);     1.5GiB;            0;                1; 2\u00d7f32[64,12,198,198]
     2.0GiB(100%);   512.0MiB;   1610612736;                2; bf16[64,198,3,12,64], f32[8]
     2.0GiB(100%);      64KiB;   2147483648;                1; s32[16384]
Memory Space: 1 (color=1)
Total bytes: 8589934592 (8.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
     8.0GiB(100%);     8.0GiB;            0;                1; f32[2048,1048576]
"""


def test_largest_buffers_from_the_memory_usage_report(tmp_path):
  (tmp_path / "module_0001.step.after_optimizations-memory-usage-report.txt").write_text(
      MEMORY_REPORT, encoding="utf-8")
  # The default memory space only, each (offset, size) once, largest first.
  assert memory.largest_buffers(str(tmp_path)) == [
      {"mib": 1536.0, "shapes": "2\u00d7f32[64,12,198,198]"},
      {"mib": 512.0, "shapes": "bf16[64,198,3,12,64], f32[8]"},
      {"mib": 0.1, "shapes": "s32[16384]"}]
  assert len(memory.largest_buffers(str(tmp_path), count=1)) == 1
  assert memory.largest_buffers(str(tmp_path / "missing")) == []


def test_sizes_as_xla_prints_them():
  assert memory.parse_size("1.5GiB") == 1.5 * GIB
  assert memory.parse_size("512B") == 512
  assert memory.parse_size("64KiB") == 64 * 1024
  assert memory.parse_size("n/a") == 0.0


def test_out_of_memory_figures_are_read_from_the_compilers_refusal():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (16.27G) exceeds available HBM (15.75G).")
  assert memory.is_out_of_memory(RuntimeError(message))
  assert memory.out_of_memory_figures(message) == {"temp_gib": 16.27,
                                                   "compiler_available_gib": 15.75}
  assert memory.out_of_memory_figures("RESOURCE_EXHAUSTED: something else") == {}
  assert not memory.is_out_of_memory(ValueError("unknown step 'trian'"))


# ---- roofline --------------------------------------------------------------------------


def test_roofline_is_bound_by_the_slowest_resource():
  chip = roofline.Chip(peak_flops=100e12, hbm_bytes=16 * GIB, hbm_bandwidth=1e12,
                       ici_bandwidth=400e9, dcn_bandwidth=10e9, source="test")
  compute_bound = roofline.roofline(chip, 50e12, 0.1e12, 0.0)
  assert compute_bound["bound_by"] == "compute"
  assert compute_bound["projected_step_seconds"] == pytest.approx(0.5)
  assert compute_bound["projected_mfu"] == pytest.approx(1.0)
  # ICI at half the bidirectional figure: 100 GB over 200 GB/s = 0.5 s, against 0.25 s of
  # compute, so the projected MFU is a half.
  ici_bound = roofline.roofline(chip, 25e12, 0.0, 100e9)
  assert ici_bound["bound_by"] == "ICI"
  assert ici_bound["ici_seconds"] == pytest.approx(0.5)
  assert ici_bound["projected_mfu"] == pytest.approx(0.5)
  assert roofline.roofline(chip, 1e12, 0.0, 0.0, dcn_bytes=10e9)["bound_by"] == "DCN"
  assert roofline.roofline(chip, 0.0, 0.0, 0.0)["projected_mfu"] == 0


def test_every_chip_of_a_topology_name_has_figures():
  assert roofline.chip_of("v5e:2x4") == "v5e"
  assert roofline.chip_of("v4:2x2x1") == "v4"
  assert set(roofline.CHIPS) == {"v4", "v5e", "v5p", "v6e"}
  assert roofline.CHIPS["v5e"].hbm_bytes == 16 * GIB
