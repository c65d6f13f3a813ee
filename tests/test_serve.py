"""`mobilemoe serve` through the real `openai` client: a server process on a free port over a tiny checkpoint."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from mobilemoe.checkpoint import load_model, save_model
from mobilemoe.config import resolve_model_config
from mobilemoe.infer.engine import COMPUTE_DTYPE, load_int4_model
from mobilemoe.infer.generate import generate_tokens
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts models route each token to experts.",
         "Hello world, small language models run on phones.", "A shared expert sees every token."] * 10
NAME = "tiny"


@pytest.fixture(scope="module", params=["float", "int4"])
def served(request, tmp_path_factory):
    """(base url, reference generate function) of a running `mobilemoe serve` on a micro-moe checkpoint."""
    int4 = request.param == "int4"
    ckpt = tmp_path_factory.mktemp("serve") / "ckpt"
    torch.manual_seed(0)
    save_model(ckpt, Transformer(resolve_model_config({"preset": "micro-moe", "vocab_size": 512})).eval(),
               train_bpe(TEXTS, vocab_size=400), int4=int4)
    model, tokenizer = load_int4_model(ckpt) if int4 else (lambda m: (m.model, m.tokenizer))(load_model(ckpt))

    def reference(ids: list[int], max_tokens: int) -> str:
        out = []
        for token in generate_tokens(model, ids, max_tokens, stop_ids=tokenizer.stop_ids(),
                                     cache_dtype=COMPUTE_DTYPE if int4 else torch.float32):
            if token in tokenizer.stop_ids():
                break
            out.append(token)
        return tokenizer.decode(out)

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mobilemoe", "serve", str(ckpt), "--port", str(port), "--name", NAME]
    proc = subprocess.Popen(cmd + (["--int4"] if int4 else []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    while True:  # until the server answers (or dies, which fails the test with its output)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read().decode()}")
        try:
            urllib.request.urlopen(f"{base}/models")
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield base, tokenizer, reference
    finally:
        proc.terminate()
        proc.wait()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0)


def test_models_and_one_plain_request_each(served):
    base, tokenizer, reference = served
    api = client(base)
    assert [m.id for m in api.models.list().data] == [NAME]

    messages = [{"role": "user", "content": "Hello world"}]
    reply = api.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    assert reply.choices[0].message.content == reference(prompt, 12)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(prompt)

    done = api.completions.create(model=NAME, prompt="The quick brown", max_tokens=10, temperature=0)
    assert done.choices[0].text == reference(tokenizer.encode("The quick brown"), 10)
    assert done.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_equals_the_plain_reply(served):
    base, _, _ = served
    api = client(base)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Mixture of experts?"}]
    plain = api.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    chunks = list(api.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_two_requests_at_once_get_their_own_answers(served):
    base, tokenizer, reference = served
    prompts = ["A shared expert", "Hello world, small"]
    want = [reference(tokenizer.encode(p), 24) for p in prompts]
    got: list = [None, None]

    def ask(i: int) -> None:
        api = client(base)
        if i == 0:  # one streamed, one plain, both in flight together
            stream = api.completions.create(model=NAME, prompt=prompts[0], max_tokens=24, temperature=0, stream=True)
            got[0] = "".join(c.choices[0].text for c in stream)
        else:
            got[1] = api.completions.create(model=NAME, prompt=prompts[1], max_tokens=24, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    base, _, _ = served
    api = client(base)
    with pytest.raises(openai.NotFoundError) as err:
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model=NAME, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=NAME, prompt="word " * 600, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model=NAME, messages=[])

    for body, status in ((b"{not json", 400), (b"[1, 2]", 400)):
        request = urllib.request.Request(f"{base}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == status
        assert set(json.loads(err.value.read())["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/nothing-here")
    assert err.value.code == 404 and "error" in json.loads(err.value.read())

    reply = api.completions.create(model=NAME, prompt="still there", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1

