"""`mobilemoe bench`: the report's figures and the bandwidth yardstick taken between the decode rounds."""

import json

from mobilemoe.infer.bench import run_bench


def test_bench_reports_decode_bandwidth_use_against_the_yardstick_of_its_own_rounds(tmp_path):
    report = run_bench(["micro-moe", "micro-dense"], [8], [8, 16], decode_steps=2, threads=[1], out=tmp_path,
                       compile=False, rounds=2)
    assert json.loads((tmp_path / "bench.json").read_text())["threads"] == [1]
    assert (tmp_path / "bench.png").stat().st_size > 0
    for model in report["models"]:
        for context in (8, 16):
            yardstick = model["yardstick"]["1"][context]
            assert yardstick["copy"] > 1e8 and yardstick["read"] > 1e8  # bytes/s of a real measurement
            streamed = (model["active_int4_bytes"] + model["kv_bytes_per_position"] * context) * \
                model["decode_tok_s"]["1"][context]
            use = model["decode_bandwidth_use"]["1"][context]
            assert abs(use["of_copy"] - streamed / yardstick["copy"]) < 1e-9 * use["of_copy"]
            assert abs(use["of_read"] - streamed / yardstick["read"]) < 1e-9 * use["of_read"]
