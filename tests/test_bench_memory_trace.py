"""The allocator-history summary (bench/memory_trace.py) on a hand-made trace: the peak, the blocks
live there with the frames that allocated them, and the reserved peak, replayed by hand."""

from __future__ import annotations

from bench import memory_trace


def test_summary_replays_the_trace(tmp_path):
    code = tmp_path / "generated.py"
    code.write_text("def call(args):\n    buf3 = empty_strided_cuda((8192, 14336), (14336, 1), torch.bfloat16)  # mm_9\n")
    torch_frame = {"filename": "/x/site-packages/torch/_tensor.py", "line": 10, "name": "__torch_function__"}
    ours = {"filename": str(code), "line": 2, "name": "call"}
    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 4096},
        {"action": "alloc", "addr": 1, "size": 500, "frames": []},
        {"action": "alloc", "addr": 2, "size": 300, "frames": [torch_frame]},  # PyTorch's own frames only
        {"action": "free_requested", "addr": 1, "size": 500},  # no longer allocated; reusable only once completed
        {"action": "segment_alloc", "addr": 5000, "size": 2048},  # while block 1 waits for another stream
        {"action": "alloc", "addr": 3, "size": 800, "frames": [torch_frame, ours]},
        {"action": "free_completed", "addr": 1, "size": 500},
        {"action": "free_requested", "addr": 99, "size": 400},  # a block from before the step
        {"action": "free_completed", "addr": 99, "size": 400},
        {"action": "alloc", "addr": 4, "size": 100, "frames": []},
        {"action": "segment_free", "addr": 0, "size": 4096},
    ]
    got = memory_trace.summarize(trace, allocated_at_start=1000, reserved_at_start=2000)
    # 1000 +500 +300 -500 +800 = 2100 with blocks 2 and 3 live; then -400 +100 = 1800
    assert got["peak_allocated"] == 2100 and got["peak_event"] == 5
    assert got["at_peak_from_the_step"] == 1100 and got["at_peak_from_before_the_step"] == 1000
    assert [b["bytes"] for b in got["at_peak_largest"]] == [800, 300]
    assert got["at_peak_largest"][0]["where"] == [f"{tmp_path.name}/generated.py:2 call  | buf3 = empty_strided_cuda("
                                                  "(8192, 14336), (14336, 1), torch.bfloat16)  # mm_9"]
    # 2000 + 4096 + 2048, when 1000 + 500 + 300 - 500 was allocated and block 1's 500 pending
    assert got["peak_reserved"] == 8144 and got["allocated_at_peak_reserved"] == 1300
    assert got["pending_at_peak_reserved"] == 500 and got["peak_reserved_event"] == 4
    lines = memory_trace.table(got).splitlines()
    assert len(lines) == 4 and "buf3" in lines[2] and lines[3].endswith("?")  # two blocks; the second's frames all PyTorch's
