"""Checkpoint sources against a real local HTTP server; nothing reaches the internet."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest

from hqsam.hqsam_core import zoo
from hqsam.hqsam_core.zoo import CheckpointSourceError, ZooEntry, fetch_checkpoint

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MIRROR_PATH = "/mirror/test.pth"
TEST_ENTRY = ZooEntry(
    name="test_model",
    filename="test.pth",
    size=len(PAYLOAD),
    url="https://example.invalid/test.pth",
    sha256_prefix=PAYLOAD_SHA256[:6],
    variant="vit_tiny",
    has_hq_head=True,
)


@dataclasses.dataclass
class SeenRequest:
    path: str
    range: str | None
    authorization: str | None


@dataclasses.dataclass
class FileServer:
    """Serves `files` by path (404 for anything else) and records every request."""

    url: str = ""
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    requests: list[SeenRequest] = dataclasses.field(default_factory=list)
    cut_after: dict[str, int] = dataclasses.field(default_factory=dict)
    ignore_range: bool = False
    send_length: bool = True
    delay_s: float = 0.0


def _handler_for(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            state.requests.append(SeenRequest(self.path, range_header, self.headers.get("Authorization")))
            time.sleep(state.delay_s)
            path = urllib.parse.urlsplit(self.path).path
            if path not in state.files:
                self.send_error(404)
                return
            body = state.files[path]
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            start = int(match[1]) if match and not state.ignore_range else 0
            if start >= len(body) > 0:
                self.send_error(416)
                return
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            if state.send_length:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: state.cut_after.get(path, len(payload))])

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # A short poll interval keeps shutdown, and so each test, fast.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("HQSAM_CACHE", str(cache))
    return cache


@pytest.fixture
def mirror(server: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """The server as HQSAM_ZOO_URL mirror, holding the file of the `test_model` zoo entry."""
    # The trailing slash checks that it is stripped.
    monkeypatch.setenv("HQSAM_ZOO_URL", f"{server.url}/mirror/")
    monkeypatch.setitem(zoo.ZOO, TEST_ENTRY.name, TEST_ENTRY)
    server.files[MIRROR_PATH] = PAYLOAD
    return server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_one_sentence(err: pytest.ExceptionInfo[CheckpointSourceError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(".")
    return message


def test_zoo_download_then_cache_hit_without_request(mirror: FileServer, cache: Path) -> None:
    path = fetch_checkpoint("test_model", progress=False)

    assert path == cache / "test.pth"
    assert path.read_bytes() == PAYLOAD
    assert [r.path for r in mirror.requests] == [MIRROR_PATH]
    assert not (cache / "test.pth.part").exists()

    assert fetch_checkpoint("test_model", progress=False) == path
    assert len(mirror.requests) == 1


@pytest.mark.parametrize(
    ("served", "send_length"),
    [(PAYLOAD + b"extra", True), (PAYLOAD[:-5], False)],
    ids=["announced-too-long", "unannounced-too-short"],
)
def test_wrong_size_is_rejected_and_discarded(
    mirror: FileServer, cache: Path, served: bytes, send_length: bool
) -> None:
    mirror.files[MIRROR_PATH] = served
    mirror.send_length = send_length

    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint("test_model", progress=False)

    message = _assert_one_sentence(err)
    assert f"{len(served)} bytes, expected {len(PAYLOAD)}" in message
    assert "discarded" in message
    assert not (cache / "test.pth").exists()
    assert not (cache / "test.pth.part").exists()


def test_wrong_sha256_prefix_is_rejected(
    mirror: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_prefix = "000000" if not PAYLOAD_SHA256.startswith("000000") else "ffffff"
    monkeypatch.setitem(zoo.ZOO, TEST_ENTRY.name, dataclasses.replace(TEST_ENTRY, sha256_prefix=wrong_prefix))

    with pytest.raises(CheckpointSourceError, match="sha256") as err:
        fetch_checkpoint("test_model", progress=False)

    assert wrong_prefix in _assert_one_sentence(err)
    assert not (cache / "test.pth").exists()
    assert not (cache / "test.pth.part").exists()


def test_leftover_part_is_resumed_with_range_request(mirror: FileServer, cache: Path) -> None:
    cache.mkdir()
    (cache / "test.pth.part").write_bytes(PAYLOAD[:123_456])

    path = fetch_checkpoint("test_model", progress=False)

    assert [r.range for r in mirror.requests] == ["bytes=123456-"]
    assert path.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_part_and_next_call_resumes(mirror: FileServer, cache: Path) -> None:
    mirror.cut_after[MIRROR_PATH] = 100_000

    with pytest.raises(CheckpointSourceError, match="resume") as err:
        fetch_checkpoint("test_model", progress=False)

    assert "100000 of 300000 bytes" in _assert_one_sentence(err)
    assert (cache / "test.pth.part").stat().st_size == 100_000

    del mirror.cut_after[MIRROR_PATH]
    path = fetch_checkpoint("test_model", progress=False)

    assert mirror.requests[-1].range == "bytes=100000-"
    assert path.read_bytes() == PAYLOAD
    assert not (cache / "test.pth.part").exists()


def test_server_ignoring_range_restarts_from_scratch(mirror: FileServer, cache: Path) -> None:
    mirror.ignore_range = True
    cache.mkdir()
    # Garbage, so that appending the full body to it could not pass the checks.
    (cache / "test.pth.part").write_bytes(b"\0" * 50_000)

    path = fetch_checkpoint("test_model", progress=False)

    assert mirror.requests[0].range == "bytes=50000-"
    assert path.read_bytes() == PAYLOAD


def test_leftover_part_longer_than_file_is_discarded(mirror: FileServer, cache: Path) -> None:
    cache.mkdir()
    (cache / "test.pth.part").write_bytes(b"\0" * (len(PAYLOAD) + 10))

    path = fetch_checkpoint("test_model", progress=False)

    assert [r.range for r in mirror.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]
    assert path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("failure", ["http-404", "connection-refused"])
def test_unreachable_file_error_names_url_and_alternatives(
    mirror: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    if failure == "http-404":
        del mirror.files[MIRROR_PATH]
        url = f"{mirror.url}{MIRROR_PATH}"
    else:
        base = f"http://127.0.0.1:{_closed_port()}"
        monkeypatch.setenv("HQSAM_ZOO_URL", base)
        url = f"{base}/test.pth"

    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint("test_model", progress=False)

    message = _assert_one_sentence(err)
    assert url in message
    assert "pass the file's path as checkpoint" in message
    assert "--checkpoint" not in message  # the Python API's words, not the CLI's flag
    assert "HQSAM_ZOO_URL" in message
    assert ("HTTP 404" in message) == (failure == "http-404")
    assert not (cache / "test.pth").exists()


def test_url_source_is_cached_under_urls(server: FileServer, cache: Path) -> None:
    server.files["/files/weights.pth"] = PAYLOAD
    url = f"{server.url}/files/weights.pth"

    # Progress on: the bar must switch itself off, stderr not being a terminal here.
    path = fetch_checkpoint(url)

    assert path.parent == cache / "urls"
    assert re.fullmatch(r"[0-9a-f]{16}-weights\.pth", path.name)
    assert path.read_bytes() == PAYLOAD
    assert fetch_checkpoint(url, progress=False) == path
    assert len(server.requests) == 1


def test_url_credentials_are_sent_but_never_shown(server: FileServer, cache: Path) -> None:
    host = server.url.removeprefix("http://")
    url = f"http://alice:s3cret@{host}/private/weights.pth?token=t0ken"

    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint(url, progress=False)

    message = _assert_one_sentence(err)
    assert f"http://{host}/private/weights.pth" in message
    assert "s3cret" not in message
    assert "t0ken" not in message
    seen = server.requests[0]
    assert seen.path == "/private/weights.pth?token=t0ken"
    assert seen.authorization == "Basic " + base64.b64encode(b"alice:s3cret").decode()


def test_concurrent_fetches_download_once(mirror: FileServer) -> None:
    mirror.delay_s = 0.2

    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda _: fetch_checkpoint("test_model", progress=False), range(3)))

    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == PAYLOAD
    assert len(mirror.requests) == 1


def test_local_path_and_file_uri_are_used_in_place(tmp_path: Path, cache: Path) -> None:
    checkpoint = tmp_path / "my weights.pth"
    checkpoint.write_bytes(b"weights")

    assert fetch_checkpoint(str(checkpoint)) == checkpoint
    assert fetch_checkpoint(checkpoint.as_uri()) == checkpoint
    assert not cache.exists()


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_missing_local_file_is_one_sentence_error(tmp_path: Path, as_uri: bool) -> None:
    missing = tmp_path / "missing.pth"

    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint(missing.as_uri() if as_uri else str(missing))

    message = _assert_one_sentence(err)
    assert str(missing) in message
    assert "does not exist" in message


def test_fsspec_uri_is_copied_and_recopied_when_remote_size_changes(cache: Path) -> None:
    memory = fsspec.filesystem("memory")
    uri = "memory://hqsam-test-zoo/weights.pth"
    memory.pipe(uri, PAYLOAD[:1000])
    try:
        path = fetch_checkpoint(uri, progress=False)
        assert path.parent == cache / "urls"
        assert path.read_bytes() == PAYLOAD[:1000]

        memory.pipe(uri, PAYLOAD[:2000])
        assert fetch_checkpoint(uri, progress=False) == path
        assert path.read_bytes() == PAYLOAD[:2000]
        assert not Path(f"{path}.part").exists()
    finally:
        memory.rm("memory://hqsam-test-zoo", recursive=True)


def test_missing_fsspec_object_is_one_sentence_error(cache: Path) -> None:
    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint("memory://hqsam-test-zoo/missing.pth", progress=False)

    message = _assert_one_sentence(err)
    assert "memory://hqsam-test-zoo/missing.pth" in message
    assert "pass the file's path as checkpoint" in message and "--checkpoint" not in message


def test_official_zoo_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HQSAM_ZOO_URL", raising=False)
    hq_tiny = zoo.zoo_entry("sam_hq_vit_tiny")
    sam_h = zoo.zoo_entry("sam_vit_h")

    assert hq_tiny.download_url() == "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_tiny.pth"
    assert (hq_tiny.size, hq_tiny.variant, hq_tiny.has_hq_head, hq_tiny.sha256_prefix) == (
        42_526_881,
        "vit_tiny",
        True,
        None,
    )
    assert sam_h.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert (sam_h.sha256_prefix, sam_h.variant, sam_h.has_hq_head) == ("4b8939", "vit_h", False)
    assert all(zoo.is_zoo_name(name) for name in ("sam_hq_vit_b", "sam_hq_vit_l", "sam_vit_b", "sam_vit_l"))
    assert not zoo.is_zoo_name("sam_hq_vit_x")

    monkeypatch.setenv("HQSAM_ZOO_URL", "https://mirror.internal/hq/")
    assert sam_h.download_url() == "https://mirror.internal/hq/sam_vit_h_4b8939.pth"


def test_unknown_zoo_name_lists_known_names() -> None:
    with pytest.raises(CheckpointSourceError, match="sam_hq_vit_tiny"):
        zoo.zoo_entry("sam_hq_vit_x")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)

    assert zoo.sha256_file(path) == PAYLOAD_SHA256


# ---------------------------------------------------------------- sha256 pins


WRONG_SHA256 = "0" * 64 if PAYLOAD_SHA256 != "0" * 64 else "f" * 64


def test_first_download_prints_and_records_its_sha256_once(
    server: FileServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.files["/files/weights.pth"] = PAYLOAD
    url = f"{server.url}/files/weights.pth"

    path = fetch_checkpoint(url, progress=False)

    printed = capsys.readouterr().err
    assert (
        f"weights.pth: sha256 {PAYLOAD_SHA256} (pin it with --checkpoint-sha256 {PAYLOAD_SHA256}" in printed
    )
    record = Path(f"{path}.sha256").read_text().split()
    assert record == [PAYLOAD_SHA256, str(len(PAYLOAD)), str(path.stat().st_mtime_ns)]
    assert zoo.file_sha256(path) == PAYLOAD_SHA256
    fetch_checkpoint(url, progress=False)  # a cache hit: nothing downloaded, nothing printed
    assert "sha256" not in capsys.readouterr().err


def test_zoo_download_prints_how_to_pin_it_by_name(
    mirror: FileServer, capsys: pytest.CaptureFixture[str]
) -> None:
    fetch_checkpoint("test_model", progress=False)

    printed = capsys.readouterr().err
    assert f"HQSAM_ZOO_SHA256=test_model={PAYLOAD_SHA256}" in printed
    assert f"--checkpoint-sha256 {PAYLOAD_SHA256}" in printed


def test_pinned_url_of_another_sha256_is_refused_and_never_cached(server: FileServer, cache: Path) -> None:
    server.files["/files/weights.pth"] = PAYLOAD
    url = f"{server.url}/files/weights.pth"

    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint(zoo.pinned(url, WRONG_SHA256), progress=False)

    message = _assert_one_sentence(err)
    assert f"has sha256 {PAYLOAD_SHA256}, not the pinned {WRONG_SHA256}" in message
    assert "discarded" in message
    left = {path.name.split("-", 1)[1] for path in (cache / "urls").iterdir()}
    assert left == {"weights.pth.lock"}  # neither the file nor a part to resume
    path = fetch_checkpoint(zoo.pinned(url, PAYLOAD_SHA256.upper()), progress=False)
    assert path.read_bytes() == PAYLOAD


def test_pin_is_checked_on_every_cache_hit(server: FileServer, cache: Path) -> None:
    server.files["/files/weights.pth"] = PAYLOAD
    url = f"{server.url}/files/weights.pth"
    path = fetch_checkpoint(url, progress=False)

    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint(f"{url}#sha256={WRONG_SHA256}", progress=False)
    assert f"delete {path} to download it again" in _assert_one_sentence(err)

    # The cached file changed after its download (same size): the pin catches it, the record is stale.
    path.write_bytes(bytes(reversed(PAYLOAD)))
    with pytest.raises(CheckpointSourceError, match="not the pinned"):
        fetch_checkpoint(f"{url}#sha256={PAYLOAD_SHA256}", progress=False)
    assert len(server.requests) == 1


def test_zoo_files_are_pinned_by_name_for_a_mirror(
    mirror: FileServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HQSAM_ZOO_SHA256", f"sam_vit_b={PAYLOAD_SHA256}, test_model={WRONG_SHA256}")
    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint("test_model", progress=False)
    assert f"not the pinned {WRONG_SHA256}" in _assert_one_sentence(err)
    assert not (cache / "test.pth").exists() and not (cache / "test.pth.part").exists()

    monkeypatch.setenv("HQSAM_ZOO_SHA256", f"test_model={PAYLOAD_SHA256}")
    assert fetch_checkpoint("test_model", progress=False).read_bytes() == PAYLOAD
    with pytest.raises(CheckpointSourceError, match="not the pinned"):  # the option's pin holds too
        fetch_checkpoint(f"test_model#sha256={WRONG_SHA256}", progress=False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("sam_hq_vit_x=" + "0" * 64, "names 'sam_hq_vit_x', no zoo file"), ("test_model=abc", "no sha256")],
)
def test_malformed_zoo_pins_are_one_sentence_errors(
    mirror: FileServer, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("HQSAM_ZOO_SHA256", value)
    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint("test_model", progress=False)
    assert expected in _assert_one_sentence(err)
    assert mirror.requests == []


def test_local_and_fsspec_sources_honour_pins(tmp_path: Path, cache: Path) -> None:
    local = tmp_path / "weights.pth"
    local.write_bytes(PAYLOAD)
    assert fetch_checkpoint(zoo.pinned(str(local), PAYLOAD_SHA256)) == local
    with pytest.raises(CheckpointSourceError) as err:
        fetch_checkpoint(zoo.pinned(str(local), WRONG_SHA256))
    assert f"Checkpoint {local} has sha256 {PAYLOAD_SHA256}" in _assert_one_sentence(err)

    memory = fsspec.filesystem("memory")
    uri = "memory://hqsam-test-pins/weights.pth"
    memory.pipe(uri, PAYLOAD)
    try:
        with pytest.raises(CheckpointSourceError, match="the copy was discarded"):
            fetch_checkpoint(zoo.pinned(uri, WRONG_SHA256), progress=False)
        assert not list((cache / "urls").glob("*weights.pth"))
        assert fetch_checkpoint(zoo.pinned(uri, PAYLOAD_SHA256), progress=False).read_bytes() == PAYLOAD
    finally:
        memory.rm("memory://hqsam-test-pins", recursive=True)


def test_pins_are_written_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert zoo.pinned("weights.pth", PAYLOAD_SHA256) == f"{tmp_path}/weights.pth#sha256={PAYLOAD_SHA256}"
    assert zoo.pinned("sam_hq_vit_l", None) == "sam_hq_vit_l"
    pinned_zoo = zoo.pinned("sam_hq_vit_l", PAYLOAD_SHA256.upper())
    assert zoo.split_pin(pinned_zoo) == ("sam_hq_vit_l", PAYLOAD_SHA256)
    assert zoo.split_pin("s3://b/w.pth#sha256=abc") == ("s3://b/w.pth#sha256=abc", None)  # no pin
    with pytest.raises(CheckpointSourceError, match="pinned twice"):
        zoo.pinned(pinned_zoo, WRONG_SHA256)
    with pytest.raises(CheckpointSourceError, match="--checkpoint-sha256 'xyz' is no sha256"):
        zoo.pinned("sam_hq_vit_l", "xyz")
    shown = zoo.shown_source(f"https://u:p@h/w.pth?X-Amz-Signature=s&v=1#sha256={PAYLOAD_SHA256}")
    assert shown == "https://***@h/w.pth?X-Amz-Signature=***&v=1"


def test_plain_http_is_warned_about_once_per_url(
    server: FileServer, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{server.url}/files/missing.pth"
    for _ in range(2):
        with pytest.raises(CheckpointSourceError):
            fetch_checkpoint(url, progress=False)

    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "plain http" in warnings[0] and url in warnings[0]
    assert "--checkpoint-sha256" in warnings[0]
    assert len(server.requests) == 2
