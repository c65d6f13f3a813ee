"""Training from Hugging Face `datasets` streams (recipes' `hub_data`), offline: local dataset directories
(JSON lines and parquet files written here) stand where hub names go; `datasets.load_dataset(<dir>,
streaming=True)` reads them as it reads the hub."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mobilemoe.checkpoint import load_model
from mobilemoe.data.streaming import HubData, HubSource, StreamedBatches
from mobilemoe.errors import MobileMoEError
from mobilemoe.tokenizer import train_bpe
from mobilemoe.train import run_recipe

WORDS = ["the", "a", "river", "stone", "bright", "quiet", "north", "market", "garden", "lamp", "winter", "music"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """prose/: two JSON-lines files of 'docN ...' texts; chat/: one parquet file of conversations; a tokenizer."""
    root = tmp_path_factory.mktemp("hub")
    rng = random.Random(0)
    (root / "prose").mkdir()
    for part in range(2):
        with (root / "prose" / f"part{part}.jsonl").open("w") as f:
            for i in range(part * 12, part * 12 + 12):
                f.write(json.dumps({"text": f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))}) + "\n")
    (root / "chat").mkdir()
    chats = [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=5)) + "?"},
              {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=8)) + "."}] for _ in range(10)]
    pq.write_table(pa.table({"messages": chats}), root / "chat" / "train.parquet")
    texts = [json.loads(line)["text"] for p in (root / "prose").iterdir() for line in p.read_text().splitlines()]
    train_bpe(texts + [m["content"] for c in chats for m in c], 300).save(root / "tokenizer.json")
    return root


def _data(hub: Path) -> HubData:
    return HubData({"prose": HubSource(str(hub / "prose")), "chat": HubSource(str(hub / "chat"))},
                   str(hub / "tokenizer.json"), hub)


def _take(batches: StreamedBatches, n: int) -> list[torch.Tensor]:
    return [torch.cat(next(batches)) for _ in range(n)]


def test_stream_rows_are_documents_packed_and_resume_bit_exact(hub):
    data = _data(hub)
    prose = data.train_batches([("prose", 1.0)], seq_len=16, batch_size=2, seed=3)
    inputs, targets = next(prose)
    first = data.tokenizer.encode(json.loads((hub / "prose" / "part0.jsonl").read_text().splitlines()[0])["text"])
    assert inputs[0, :16].tolist() == (first + [data.tokenizer.eos_id])[:16]  # documents in order, packed
    assert torch.equal(targets[0, :-1], inputs[0, 1:]) and torch.equal(inputs[1, 0], targets[0, -1])
    chat = next(data.train_batches([("chat", 1.0)], seq_len=32, batch_size=2, seed=3))[1]
    assert (chat == -100).any() and (chat != -100).any()  # loss on assistant tokens only
    # 12 steps of 4 rows of 32 tokens run past the end of the chat data (~500 tokens): epochs wrap
    mixture = [("prose", 0.5), ("chat", 0.5)]
    whole = _take(data.train_batches(mixture, seq_len=32, batch_size=4, seed=5), 12)
    for stop in (2, 10):
        first_part = data.train_batches(mixture, seq_len=32, batch_size=4, seed=5)
        head = _take(first_part, stop)
        state = json.loads(json.dumps(first_part.state_dict()))  # as the checkpoint stores it
        resumed = _data(hub).train_batches(mixture, seq_len=32, batch_size=4, seed=5)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(head + _take(resumed, 12 - stop), whole, strict=True))
    assert max(s["epoch"] for s in state["streams"]) >= 1  # the resume crossed an epoch boundary
    other = _take(data.train_batches(mixture, seq_len=32, batch_size=4, seed=6), 12)
    assert not all(torch.equal(a, b) for a, b in zip(other, whole, strict=True))  # the seed draws the mixture


def _recipe(hub: Path, **stage) -> dict:
    base = {"seq_len": 32, "batch_size": 4, "lr": 3e-3, "eval_every": 2, "checkpoint_every": 2, "log_every": 1}
    return {"name": "stream", "seed": 7, "model": "micro-moe", "tokenizer": str(hub / "tokenizer.json"),
            "hub_data": {"prose": str(hub / "prose"), "chat": {"name": str(hub / "chat"), "split": "train"}},
            "stages": [{"name": "pretrain", "kind": "pretrain", "mixture": {"prose": 0.8, "chat": 0.2}, "steps": 4,
                        **base, **stage},
                       {"name": "sft", "kind": "sft", "mixture": {"chat": 1.0}, "steps": 2, **base}]}


def test_recipe_trains_from_streams_and_resumes_bit_exact(hub, tmp_path, interrupted_at):
    summary = run_recipe(_recipe(hub), tmp_path / "a")
    assert list(summary["stages"]) == ["pretrain", "sft"] and summary["final_val_loss"] is None
    with interrupted_at(StreamedBatches, 3), pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(hub), tmp_path / "b")
    run_recipe(_recipe(hub), tmp_path / "b", resume=True)
    for stage in ("pretrain", "sft"):
        losses = [[json.loads(line)["loss"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
                  for run in (tmp_path / "a", tmp_path / "b")]
        assert losses[0] == losses[1]
    a, b = (load_model(run / "sft" / "final").model.state_dict() for run in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_hub_name_is_one_clear_message(hub, tmp_path):
    recipe = _recipe(hub)
    recipe["hub_data"]["prose"] = "nobody-here/no-such-dataset"
    with pytest.raises(MobileMoEError, match="could not open Hugging Face dataset 'nobody-here/no-such-dataset'"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


READ_RANKS = """
import json, re, sys
from pathlib import Path
import torch.distributed as dist
from mobilemoe.data.streaming import HubData, HubSource
from mobilemoe.train import run_recipe
from mobilemoe.train.parallel import init_world

hub, out = Path(sys.argv[1]), Path(sys.argv[2])
run_recipe(str(hub / "two.yaml"), out / "run")
world = init_world()
data = HubData({"prose": HubSource(str(hub / "prose"))}, str(hub / "tokenizer.json"), hub)
batches = data.train_batches([("prose", 1.0)], seq_len=16, batch_size=2, seed=1, rank=world.rank, world_size=world.size)
# one source: consecutive rows' inputs are the rank's token stream, back to back
stream = [token for _ in range(24) for row in next(batches)[0] for token in row.tolist()]
seen = set(re.findall(r"doc(\\d+) ", data.tokenizer.decode(stream)))
everyone = [None] * world.size
dist.all_gather_object(everyone, sorted(seen))
if world.rank == 0:
    (out / "seen.json").write_text(json.dumps(everyone))
"""


def test_two_torchrun_processes_stream_disjoint_documents(hub, tmp_path):
    recipe = _recipe(hub)
    recipe["stages"] = recipe["stages"][:1]
    (hub / "two.yaml").write_text(yaml.safe_dump({**recipe, "stages": [{**recipe["stages"][0], "steps": 2}]}))
    (tmp_path / "read_ranks.py").write_text(READ_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29541", str(tmp_path / "read_ranks.py"), str(hub), str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    rank0, rank1 = (set(s) for s in json.loads((tmp_path / "seen.json").read_text()))
    # two JSON-lines files for two ranks: one file each (split_dataset_by_node), so no document is seen twice
    assert rank0 and rank1 and not rank0 & rank1
    assert rank0 | rank1 == {str(i) for i in range(24)}
