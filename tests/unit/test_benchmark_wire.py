"""benchmark's reading and writing of the providers' wire formats."""

from __future__ import annotations

import json
import socket
import time
from decimal import Decimal

import pytest

from services.benchmark.providers import (
    Endpoint,
    Prompt,
    ProtocolError,
    StampedSocket,
    parse_ollama_line,
    parse_sse_line,
    request_of,
)


def test_ollama_lines_carry_output_and_the_last_one_the_counts() -> None:
    first = parse_ollama_line('{"model":"m","response":"Hel","done":false}')
    assert first is not None and first.output and not first.done
    chat = parse_ollama_line('{"message":{"role":"assistant","content":"lo"},"done":false}')
    assert chat is not None and chat.output
    last = parse_ollama_line(
        json.dumps(
            {
                "response": "",
                "done": True,
                "prompt_eval_count": 26,
                "eval_count": 290,
                "eval_duration": 4709213000,
            }
        )
    )
    assert last is not None and last.done and not last.output
    assert (last.prompt_tokens, last.output_tokens, last.eval_ns) == (26, 290, 4709213000)
    error = parse_ollama_line('{"error":"model \\"x\\" not found"}')
    assert error is not None and error.error == 'model "x" not found'
    assert parse_ollama_line("") is None
    with pytest.raises(ProtocolError):
        parse_ollama_line("<html>")


def test_sse_lines_skip_comments_and_role_chunks_and_read_usage_with_cost() -> None:
    assert parse_sse_line(": OPENROUTER PROCESSING") is None
    assert parse_sse_line("") is None
    role = parse_sse_line(
        'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    )
    assert role is not None and not role.output
    content = parse_sse_line('data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}')
    assert content is not None and content.output
    reasoning = parse_sse_line('data: {"choices":[{"delta":{"reasoning":"hmm"}}]}')
    assert reasoning is not None and reasoning.output
    usage = parse_sse_line(
        'data: {"choices":[],"usage":{"prompt_tokens":194,"completion_tokens":2,'
        '"total_tokens":196,"cost":0.95}}'
    )
    assert usage is not None and not usage.output
    assert (usage.prompt_tokens, usage.output_tokens, usage.cost_usd) == (194, 2, Decimal("0.95"))
    done = parse_sse_line("data: [DONE]")
    assert done is not None and done.done
    error = parse_sse_line('data: {"error":{"message":"overloaded","code":502}}')
    assert error is not None and error.error == "overloaded"


def test_requests_follow_each_providers_api() -> None:
    ollama = Endpoint("ollama", "http://gpu:11434/")
    url, body, _ = request_of(ollama, Prompt("llama3", "generate", "hi", 64))
    assert url == "http://gpu:11434/api/generate"
    assert body == {
        "model": "llama3",
        "stream": True,
        "options": {"num_predict": 64},
        "prompt": "hi",
    }
    url, body, _ = request_of(ollama, Prompt("llama3", "chat", "hi"))
    assert url == "http://gpu:11434/api/chat"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    router = Endpoint("openrouter", "https://openrouter.ai", "sk-or")
    url, body, headers = request_of(router, Prompt("a/b", "generate", "hi", 10))
    assert url == "https://openrouter.ai/api/v1/chat/completions"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 10
    assert headers["Authorization"] == "Bearer sk-or"
    _, _, headers = request_of(Endpoint("openai", "http://vllm/v1"), Prompt("m", "chat", "x"))
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('data: {"choices":[1,"x"]}', "choices[0] is not an object"),
        ('data: {"choices":"abc"}', "choices is not a list"),
        ('data: {"id":"x"}', "without choices or usage"),
        ('data: {"choices":[{"delta":"hi"}]}', "choices[0].delta is not an object"),
        ("data: [1, 2]", "JSON that is not an object"),
        ("data: {not json", "not JSON"),
        ("<!DOCTYPE html><html>", "an HTML page"),
    ],
)
def test_sse_of_the_wrong_shape_is_a_protocol_error_that_says_what(line: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_sse_line(line)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"message": "hi", "done": false}', "message is not an object"),
        ('{"model": "m"}', "without response, message or done"),
        ("<html><body>502 Bad Gateway</body></html>", "an HTML page"),
        ("[]", "JSON that is not an object"),
    ],
)
def test_ndjson_of_the_wrong_shape_is_a_protocol_error_that_says_what(
    line: str, reason: str
) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_ollama_line(line)


def test_a_chunk_with_running_usage_tells_its_token_count() -> None:
    chunk = parse_sse_line(
        'data: {"choices":[{"delta":{"content":"a b c"}}],'
        '"usage":{"prompt_tokens":3,"completion_tokens":6}}'
    )
    assert chunk is not None and chunk.output and chunk.output_tokens == 6


@pytest.mark.parametrize("read", ["recv", "recv_into"])
def test_a_read_is_stamped_when_its_bytes_reached_the_kernel(read: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = StampedSocket(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            client.connect(listener.getsockname())
            server, _ = listener.accept()
            with server:
                # Linux turns receive stamps on for the machine a moment after the first
                # socket asks: until a read is stamped, its arrival is the read's own time
                deadline = time.perf_counter() + 5
                while True:
                    server.sendall(b"w")
                    before_read = time.perf_counter()
                    assert client.recv(1) == b"w"
                    assert client.arrival is not None
                    if client.arrival < before_read or time.perf_counter() > deadline:
                        break
                server.sendall(b"first")
                sent = time.perf_counter()
                time.sleep(0.1)  # the bytes wait in the receive queue
                if read == "recv":
                    data = client.recv(100)
                else:
                    buffer = bytearray(100)
                    data = bytes(buffer[: client.recv_into(buffer)])
                read_at = time.perf_counter()
    assert data == b"first"
    assert client.arrival is not None
    # stamped when they arrived (within the send, on loopback), not when they were read
    assert client.arrival < sent + 0.01 < read_at - 0.08
