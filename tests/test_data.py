"""Data pipeline: shards, packing, loss masks, mixtures, determinism and resume, loaders, errors."""

import json
from xml.sax.saxutils import escape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mobilemoe.data import IGNORE_INDEX, PackedBatches, PreparedData, Shard, iter_eval_batches, prepare, write_shard
from mobilemoe.data.documents import chunk_text, clean_text, read_path
from mobilemoe.errors import MobileMoEError

EOS = 0


def make_shard(path, docs, masks=None, vocab=1000):
    masks = masks or [None] * len(docs)
    write_shard(path, zip(docs, masks, strict=True), vocab_size=vocab, eos_id=EOS)
    return path


def counting_shard(path, n_docs=20, doc_len=10, start=1):
    """Documents of consecutive ids, so every token in the stream is unique and positions are checkable."""
    docs = [list(range(start + i * doc_len, start + (i + 1) * doc_len)) for i in range(n_docs)]
    return make_shard(path, docs)


def take(batches, n):
    return [next(batches) for _ in range(n)]


# --- shards -----------------------------------------------------------------------------------------
def test_shard_roundtrip_dtype_and_eos(tmp_path):
    make_shard(tmp_path / "a", [[5, 6, 7], [8]])
    shard = Shard.open(tmp_path / "a")
    assert shard.tokens.dtype == np.uint16
    assert shard.tokens.tolist() == [5, 6, 7, EOS, 8, EOS]
    assert shard.offsets.tolist() == [0, 4, 6]
    assert shard.mask is None
    make_shard(tmp_path / "big", [[70000]], vocab=100_000)
    assert Shard.open(tmp_path / "big").tokens.dtype == np.uint32


def test_shard_index_mismatch_is_clear_error(tmp_path):
    make_shard(tmp_path / "a", [[5, 6, 7], [8]])
    np.save(tmp_path / "a" / "index.npy", np.array([0, 4, 9], dtype=np.int64))
    with pytest.raises(MobileMoEError, match="corrupt: its index covers 9 tokens but tokens.bin holds 6"):
        Shard.open(tmp_path / "a")


def test_truncated_tokens_file_is_clear_error(tmp_path):
    make_shard(tmp_path / "a", [[5, 6, 7], [8]])
    data = (tmp_path / "a" / "tokens.bin").read_bytes()
    (tmp_path / "a" / "tokens.bin").write_bytes(data[:-2])
    with pytest.raises(MobileMoEError, match="corrupt"):
        PackedBatches([(tmp_path / "a", 1.0)], seq_len=2, batch_size=1, seed=0)


# --- packing and masks -------------------------------------------------------------------------------
def test_packing_rows_are_contiguous_stream_with_eos_separators(tmp_path):
    counting_shard(tmp_path / "s", n_docs=4, doc_len=5)
    x, y = next(PackedBatches([(tmp_path / "s", 1.0)], seq_len=8, batch_size=2, seed=0))
    assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next token
    assert torch.equal(x[1, 0], y[0, -1])  # the second row continues where the first ended
    stream = torch.cat([x[0], x[1], y[1, -1:]]).tolist()
    # 17 tokens: whole documents of 5 ids each followed by EOS, in a shuffled document order
    docs = " ".join(map(str, stream)).split(f" {EOS} ")
    assert stream.count(EOS) == 2
    assert all(len(d.split()) == 5 for d in docs[:2])


def test_sft_mask_trains_only_assistant_tokens(tmp_path):
    from mobilemoe.tokenizer import train_bpe

    tok = train_bpe(["hello there, how are you? fine thanks."] * 20, vocab_size=300)
    ids, mask = tok.encode_chat([{"role": "user", "content": "hello there"},
                                 {"role": "assistant", "content": "fine thanks"}])
    write_shard(tmp_path / "c", [(ids, mask)], vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    x, y = next(iter_eval_batches(tmp_path / "c", seq_len=len(ids) + 4, batch_size=1))
    trained = y[0][y[0] != IGNORE_INDEX].tolist()
    assert tok.decode(trained) == "fine thanks<|im_end|>"


# --- mixture, determinism, resume, distributed ---------------------------------------------------------
def test_mixture_proportions_follow_weights(tmp_path):
    a = counting_shard(tmp_path / "a", start=1)
    b = counting_shard(tmp_path / "b", start=500)
    rows = torch.cat([x for x, _ in take(PackedBatches([(a, 3.0), (b, 1.0)], seq_len=4, batch_size=50, seed=0), 40)])
    from_a = (rows[:, 0] < 500).float().mean().item()
    assert abs(from_a - 0.75) < 0.03  # 2000 rows: 3 standard deviations is ~0.03


def test_deterministic_given_seed(tmp_path):
    s = counting_shard(tmp_path / "s")
    one = take(PackedBatches([(s, 1.0)], seq_len=7, batch_size=3, seed=5), 6)
    two = take(PackedBatches([(s, 1.0)], seq_len=7, batch_size=3, seed=5), 6)
    other = take(PackedBatches([(s, 1.0)], seq_len=7, batch_size=3, seed=6), 6)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(one, two, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(one, other, strict=True))


def test_resume_sees_exactly_the_uninterrupted_batches(tmp_path):
    sources = [(counting_shard(tmp_path / "a", start=1), 1.0), (counting_shard(tmp_path / "b", start=500), 2.0)]
    full = take(PackedBatches(sources, seq_len=6, batch_size=4, seed=1), 30)  # several epochs of each source
    first = PackedBatches(sources, seq_len=6, batch_size=4, seed=1)
    take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (trainer_state.json)
    resumed = PackedBatches(sources, seq_len=6, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(full[13:], take(resumed, 17), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_every_token_is_a_target_once_per_epoch(tmp_path):
    s = counting_shard(tmp_path / "s", n_docs=10, doc_len=9)  # 100 tokens with EOS
    batches = take(PackedBatches([(s, 1.0)], seq_len=10, batch_size=5, seed=3), 2)
    first = batches[0][0][0, 0].item()  # the stream's first token is only ever an input
    targets = torch.cat([y.flatten() for _, y in batches]).tolist()
    # targets are stream positions 1..100: the rest of epoch 0, then the first token of epoch 1
    assert sorted(t for t in targets[:-1] if t != EOS) == sorted(set(range(1, 91)) - {first})


def test_world_size_two_sees_the_global_batch_of_one_process(tmp_path):
    sources = [(counting_shard(tmp_path / "a", start=1), 1.0), (counting_shard(tmp_path / "b", start=500), 1.0)]
    single = take(PackedBatches(sources, seq_len=5, batch_size=6, seed=2), 5)
    ranks = [take(PackedBatches(sources, seq_len=5, batch_size=3, seed=2, rank=r, world_size=2), 5) for r in (0, 1)]
    for step in range(5):
        assert torch.equal(single[step][0], torch.cat([ranks[0][step][0], ranks[1][step][0]]))
        assert torch.equal(single[step][1], torch.cat([ranks[0][step][1], ranks[1][step][1]]))


def test_mixture_weight_must_be_positive(tmp_path):
    s = counting_shard(tmp_path / "s")
    with pytest.raises(MobileMoEError, match="mixture weight .* must be > 0, got 0"):
        PackedBatches([(s, 1.0), (s, 0.0)], seq_len=4, batch_size=2, seed=0)


def test_eval_batches_cover_the_split_and_pad_the_last_row(tmp_path):
    s = counting_shard(tmp_path / "s", n_docs=3, doc_len=9)  # 30 tokens -> 29 targets
    batches = list(iter_eval_batches(s, seq_len=8, batch_size=2))
    assert [x.shape[0] for x, _ in batches] == [2, 2]
    targets = torch.cat([y.flatten() for _, y in batches])
    assert (targets != IGNORE_INDEX).sum().item() == 29
    assert len(list(iter_eval_batches(s, seq_len=8, batch_size=2, max_batches=1))) == 1


# --- documents and loaders ---------------------------------------------------------------------------
def test_loaders_text_jsonl_parquet_arrow(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain text file")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "json line"}) + "\n" + json.dumps(
        {"prompt": "hi", "response": "hello"}) + "\n")
    table = pa.table({"body": ["parquet row"]})
    pq.write_table(table, tmp_path / "d" / "c.parquet")
    chat = pa.table({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]})
    with pa.ipc.new_stream(tmp_path / "d" / "e.arrow", chat.schema) as w:
        w.write_table(chat)
    docs = list(read_path(tmp_path / "d"))
    assert docs == ["plain text file", "json line", [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}],
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert list(read_path(tmp_path / "d" / "c.parquet", text_field="body")) == ["parquet row"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one\u2028two\x1cthree"}, ensure_ascii=False) + "\n")
    assert list(read_path(tmp_path / "a.jsonl")) == ["one\u2028two\x1cthree"]


def test_empty_and_non_utf8_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(MobileMoEError, match="empty.txt is empty"):
        list(read_path(tmp_path / "empty.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MobileMoEError, match=r"not UTF-8 text \(bad byte 0xe9 at offset 3\)"):
        list(read_path(tmp_path / "latin.txt"))


def test_clean_and_chunk():
    assert clean_text("<p>Hello   <b>world</b></p>\r\n\r\n\r\n\r\nBye ") == "Hello world\n\nBye"
    chunks = chunk_text("\n\n".join(["x" * 40] * 10), max_chars=100)
    assert len(chunks) == 5 and all(len(c) <= 100 for c in chunks)


# --- prepare -----------------------------------------------------------------------------------------
WORDS = ["ships", "whales", "sea", "captain", "harpoon", "deck", "storm", "sail", "wind", "crew", "island", "ocean"]
PROSE = [" ".join(np.random.default_rng(i).choice(WORDS, 60)) + "." for i in range(40)]  # distinct documents


def write_recipe(tmp_path, **extra):
    (tmp_path / "prose").mkdir(exist_ok=True)
    for i, text in enumerate(PROSE):
        (tmp_path / "prose" / f"{i:02d}.txt").write_text(text)
    (tmp_path / "prose" / "dup.txt").write_text(PROSE[0])  # an exact duplicate, dropped
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                             {"role": "assistant", "content": f"{i} plus one is {i + 1}."}]}) + "\n")
    recipe = {"name": "t", "val_fraction": 0.1, "tokenizer": {"train_bpe": 320},
              "sources": {"prose": {"kind": "pretrain", "from": ["prose"]},
                          "chat": {"kind": "sft", "from": [{"path": "chat.jsonl", "license": "CC0-1.0"}]}}, **extra}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return tmp_path / "data.yaml"


def test_prepare_builds_shards_manifest_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path / "cache"))
    data = prepare(write_recipe(tmp_path), quiet=True)
    assert data.dir.parent == tmp_path / "cache" / "prepared"
    assert data.source_names() == ["prose", "chat"] and data.kind("chat") == "sft"
    assert data.tokenizer.vocab_size == 320
    m = data.manifest
    assert m["sources"]["prose"]["duplicates"] == 1
    assert m["sources"]["prose"]["train"]["documents"] == 36 and m["sources"]["prose"]["val"]["documents"] == 4
    assert m["sources"]["chat"]["licenses"] == ["CC0-1.0"]
    assert m["sources"]["chat"]["train"]["loss_tokens"] < m["sources"]["chat"]["train"]["tokens"]
    data.verify()
    stamp = (data.dir / "manifest.json").stat().st_mtime_ns
    again = prepare(tmp_path / "data.yaml", quiet=True)
    assert again.dir == data.dir and (data.dir / "manifest.json").stat().st_mtime_ns == stamp  # not redone
    batches = PackedBatches([(data.shard_dir("prose"), 1.0), (data.shard_dir("chat"), 1.0)], 16, 4, seed=0)
    x, _ = next(batches)
    assert x.max().item() < data.tokenizer.vocab_size


def test_prepare_error_leaves_nothing_half_written(tmp_path):
    recipe = write_recipe(tmp_path)
    (tmp_path / "prose" / "bad.txt").write_bytes(b"\xff\xfe oops")
    with pytest.raises(MobileMoEError, match="bad.txt is not UTF-8"):
        prepare(recipe, out=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_leakage_check_drops_documents_sharing_benchmark_ngrams(tmp_path):
    (tmp_path / "bench.jsonl").write_text(json.dumps({"text": PROSE[3]}) + "\n")
    recipe = write_recipe(tmp_path, leakage={"ngram": 8, "benchmarks": ["bench.jsonl"]})
    data = prepare(recipe, out=tmp_path / "out", quiet=True)
    assert data.manifest["sources"]["prose"]["leaked"] >= 1
    assert data.manifest["leakage"]["benchmark_ngrams"] > 0


def test_tokenizer_too_big_for_model_is_clear_error(tmp_path):
    data = prepare(write_recipe(tmp_path), out=tmp_path / "out", quiet=True)
    data.check_vocab(320)
    with pytest.raises(MobileMoEError, match="320 tokens but the model's vocab_size is 256"):
        data.check_vocab(256)


def test_prepared_data_and_recipe_errors(tmp_path):
    with pytest.raises(MobileMoEError, match="not prepared data"):
        PreparedData(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"tokenizer": {"train_bpe": 300},
                                                     "sources": {"x": {"kind": "pretraining", "from": ["a"]}}}))
    with pytest.raises(MobileMoEError, match="source 'x' needs kind"):
        prepare(tmp_path / "r.yaml", quiet=True)


# --- batched chat encoding, registry extractors ----------------------------------------------------------
def test_encode_chat_batch_equals_one_encode_per_piece():
    from mobilemoe.tokenizer import train_bpe

    tok = train_bpe(["hello there, how are you? fine thanks. héllo wörld\n"] * 20, vocab_size=300)
    conversations = [[{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"}],
                     [{"role": "system", "content": ""}, {"role": "user", "content": "héllo\u2028 <|im_end|>"},
                      {"role": "assistant", "content": ""}, {"role": "assistant", "content": "wörld\n\n"}],
                     [{"role": "user", "content": "how are you?"}]]

    def reference(messages, add_generation_prompt):  # the unbatched definition of the chat template
        ids, mask = [], []
        for m in messages:
            head = [tok.im_start_id, *tok.encode(m["role"] + "\n")]
            body = [*tok.encode(m["content"]), tok.im_end_id]
            ids += head + body + tok.encode("\n")
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tok.encode("\n"))
        if add_generation_prompt:
            head = [tok.im_start_id, *tok.encode("assistant\n")]
            ids, mask = ids + head, mask + [False] * len(head)
        return ids, mask

    for gen in (False, True):
        expected = [reference(c, gen) for c in conversations]
        assert tok.encode_chat_batch(conversations, gen) == expected
        assert [tok.encode_chat(c, gen) for c in conversations] == expected
    assert tok.encode_chat_batch([]) == []


def test_wikipedia_extractor_strips_markup(tmp_path):
    import bz2

    from mobilemoe.data.registry import wikipedia

    article = ("{{Infobox country|name=Atlantis|capital=[[Poseidonia]]}}\n'''Atlantis''' is a fictional island "
               "in [[Plato]]'s dialogues<ref name=p>{{cite book|title=Timaeus}}</ref> ([[Ancient Greek|Greek]]: "
               "{{lang|grc|Ἀτλαντὶς}}).<!-- hidden -->\n\n== History ==\n* It sank in a [[flood]] "
               "[http://example.org one day].\n{| class=wikitable\n|-\n| a || b\n|}\n"
               "[[File:Atlantis.png|thumb|A map of [[Atlantis]]]]\nThe story is told &amp; retold. " + "x " * 120 +
               "\n\n== References ==\n{{reflist}}\n[[Category:Myths]]")
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    pages = [("Atlantis", 0, article), ("Atlantis (island)", 0, "#REDIRECT [[Atlantis]]"),
             ("Wikipedia:About", 4, "About " * 100)]
    xml = f'<mediawiki xmlns="{ns}">' + "".join(
        f"<page><title>{t}</title><ns>{n}</ns><revision><text>{escape(body)}</text></revision></page>"
        for t, n, body in pages) + "</mediawiki>"
    (tmp_path / "enwiki-latest-pages-articles1.xml-shortened.bz2").write_bytes(bz2.compress(xml.encode()))
    docs = list(wikipedia(tmp_path))
    assert len(docs) == 1
    text = docs[0]
    assert text.startswith("Atlantis\n\nAtlantis is a fictional island in Plato's dialogues (Greek: ).\n\nHistory\n"
                           "It sank in a flood one day.\n\nThe story is told & retold.")
    for junk in ("{{", "}}", "[[", "]]", "<ref", "hidden", "Infobox", "wikitable", "Category", "File:", "reflist"):
        assert junk not in text


def test_jane_austen_extractor_reads_an_r_lazy_load_database(tmp_path):
    import struct
    import zlib

    import rdata

    from mobilemoe.data.registry import jane_austen

    data = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    books = {"emma": ["EMMA", "", "By Jane Austen", "", "It was a truth", "wrapped here.", "", "Next."],
             "persuasion": ["Persuasion", "", "Sir Walter"]}
    database, index = b"", {}
    for name, lines in books.items():  # each record: 4-byte length + zlib(serialized character vector)
        rdata.write_rds(tmp_path / "x.rds", np.array(lines), compression=None)
        raw = (tmp_path / "x.rds").read_bytes()
        record = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = np.array([len(database), len(record)], dtype=np.int32)
        database += record
    (data / "Rdata.rdb").write_bytes(database)
    rdata.write_rds(data / "Rdata.rdx", {"variables": index, "references": {}, "compressed": np.array([True])})
    assert list(jane_austen(tmp_path)) == ["EMMA\n\nBy Jane Austen\n\nIt was a truth wrapped here.\n\nNext.",
                                           "Persuasion\n\nSir Walter"]
