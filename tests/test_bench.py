"""`mobilemoe bench`: the report's figures and the bandwidth yardstick taken between the decode rounds."""

import json

from mobilemoe.config import get_preset
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


def test_bench_runs_each_model_with_each_kv_cache(tmp_path):
    report = run_bench(["micro-moe"], [8], [8], decode_steps=2, threads=[1], out=tmp_path, compile=False, rounds=1,
                       kv_caches=("fp16", "int8"))
    fp16, int8 = report["models"]
    assert (fp16["kv_cache"], int8["kv_cache"]) == ("fp16", "int8") and fp16["preset"] == int8["preset"]
    cfg = get_preset("micro-moe")
    rows = cfg.n_layers * cfg.n_kv_heads * 2  # keys and values of every layer and kv head
    assert fp16["kv_bytes_per_position"] == rows * cfg.head_dim * 2
    assert int8["kv_bytes_per_position"] == rows * (cfg.head_dim + 4)  # int8 values and an fp32 scale
    assert int8["decode_tok_s"]["1"][8] > 0
