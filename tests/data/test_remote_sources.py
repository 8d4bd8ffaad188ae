"""Sources given as fsspec URLs: globs over file://, and http:// files with seek-based resume."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest
import torch

from launcher.data.sources import resolve_corpus

from .data_fixtures import data_config, loaders, take


@pytest.fixture
def corpus(corpus_dir, tokenizer):
    return corpus_dir, tokenizer


@pytest.fixture(scope="module")
def http_root(corpus_dir):
    """The corpus folder served over HTTP (with Range support, which seeking needs)."""
    root = corpus_dir
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # minimal "Range: bytes=a-b" support on top of the stdlib server
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not spec:
            return super().do_GET()
        with open(path, "rb") as f:
            data = f.read()
        start, _, end = spec.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


def urls_config(root, web: list[str], books: list[str]):
    return data_config(
        root,
        sources=[
            {"name": "web", "paths": web, "weight": 0.6},
            {"name": "books", "paths": books, "weight": 0.4},
        ],
    )


def test_file_urls_with_globs_stream_like_local_paths(corpus):
    root, tokenizer = corpus
    local = take(loaders(data_config(root), tokenizer, 1)[0], 10)
    cfg = urls_config(root, [f"file://{root}/web-*"], [f"file://{root}/books-*.jsonl.gz"])
    assert [len(s.files) for s in resolve_corpus(cfg).sources] == [5, 2]
    remote = take(loaders(cfg, tokenizer, 1)[0], 10)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_http_sources_stream_and_resume_at_the_saved_offset(corpus, http_root):
    root, tokenizer = corpus
    web = [f"{http_root}/{p.name}" for p in sorted(root.glob("web-*"))]
    books = [f"{http_root}/{p.name}" for p in sorted(root.glob("books-*"))]
    cfg = urls_config(root, web, books)
    full = take(loaders(cfg, tokenizer, 1)[0], 30)
    [first] = loaders(cfg, tokenizer, 1)
    take(first, 12)
    state = json.loads(json.dumps(first.state_dict()))
    [second] = loaders(cfg, tokenizer, 1)
    second.load_state_dict(state)
    rest = take(second, 18)
    for a, b in zip(full[12:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
