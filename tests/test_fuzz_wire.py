"""Wire fuzzer: random and mutated MDP/0.2 traffic against a real ``tts-broker serve``.

Clients send random frames, mutated REQUESTs and TTS bodies full of odd JSON
(lone surrogates, control characters, wrong types, unknown keys, values out
of range, bad request ids), cancels, status and MMI requests. Fake workers on
the backend send random frames, READYs with random service names and
capabilities, and random or mutated replies to the jobs they are given,
heartbeats and disconnects. Every peer here is hand-written from PROTOCOL.md:
nothing imports the broker's own framing.

Each Hypothesis example is one *batch* of such messages. After every batch:

* every TTS request that got any reply got exactly one FINAL, last, and a
  well-formed stream (one ``start`` before audio, gapless sequence numbers);
  every request that the protocol says must be answered was answered; every
  ``tts.cancel``, ``tts.status`` and ``mmi.*`` request got one FINAL;
* the broker still answers ``mmi.service`` ``tts`` with 200, and a real
  request on a fresh connection still ends ``end`` with speech;
* ``serve`` is still running and its log shows no traceback and no stopped
  broker loop.

With only the real Piper worker behind the broker (the client tests), a
FINAL ``internal`` is also a failure: the one healthy engine failed on input
the broker admitted, which it should have refused or cleaned.

Shrinking is off: the broker is one long-lived process, so an example that
breaks it would make every later (smaller) example fail too, and the shrinker
would report a meaningless empty batch. The falsifying example Hypothesis
prints is the batch after which the check failed; the failure message also
lists the READYs of earlier batches and the last two batches in full, since
what a batch leaves in the broker (a registration, a queued request) can be
what breaks a later one. A failure is latched per test, so Hypothesis's replay
of the failing example fails the same way.

Bounded in count and time: ``TTS_FUZZ_EXAMPLES`` examples per test (default
below) and at most ``TTS_FUZZ_BUDGET_S`` seconds of generating per test;
raise both for a longer run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Union

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import EN_VOICE, Served, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawClient, RawStream

EXAMPLES = int(os.environ.get("TTS_FUZZ_EXAMPLES", "25"))
BUDGET_S = float(os.environ.get("TTS_FUZZ_BUDGET_S", "9"))
MAX_TEXT = 200
"""The fuzz broker's ``max_text_chars``: small, so ``too_large`` costs nothing to reach."""

EN_SERVICE = f"piper.{EN_VOICE}".encode()
FAKE_VOICE_SERVICE = b"piper.fz_FZ-fuzz-low"
OPAQUE = b"fz.echo"
ERROR_CODES = {"bad_request", "too_large", "unavailable", "timeout", "cancelled", "overloaded", "internal"}
MDPC, MDPW = b"MDPC02", b"MDPW02"

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
    report_multiple_bugs=False,
)


def summary(events: list[tuple[bool, list[bytes]]]) -> str:
    """``start, audio x19, mark, FINAL end``: a stream's events, run-length encoded."""
    out: list[list] = []
    for final, body in events:
        name = ("FINAL " if final else "") + (body[1].decode(errors="replace") if len(body) > 1 else repr(body))
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in out)


def is_tts_service(name: bytes) -> bool:
    return name == b"tts" or name.startswith((b"piper.", b"xtts"))


def valid_service_name(name: bytes) -> bool:
    """PROTOCOL.md: printable ASCII, 1-255 bytes, no spaces."""
    return 1 <= len(name) <= 255 and all(0x21 <= b <= 0x7E for b in name)


# --------------------------------------------------------------------------
# The broker under fuzz
# --------------------------------------------------------------------------


class Fuzzed:
    """The broker under fuzz, how far its log has been checked, and what was sent to it."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.log_pos = 0
        self.batches = 0
        self.messages = 0
        self.started: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        """Per test, the first failure: the broker is one process, so once broken it stays broken."""
        self.history: list[tuple[int, list]] = []
        """Every batch so far: what a batch leaves behind in the broker may be what breaks a later one."""

    def __repr__(self) -> str:
        return f"<broker at {self.served.frontend}, {self.batches} batches so far>"

    def new_log(self) -> str:
        with self.served.log.open("rb") as f:
            f.seek(self.log_pos)
            data = f.read()
        self.log_pos += len(data)
        return data.decode(errors="replace")

    def out_of_time(self, test: str) -> bool:
        start = self.started.setdefault(test, time.monotonic())
        return time.monotonic() - start > BUDGET_S

    def batch(self, test: str, ops: list, client_only: bool) -> None:
        """Run one batch for ``test`` and check the broker after it.

        A failure is latched: when Hypothesis replays the failing example to
        report it, it fails the same way instead of finding a broker that has
        since recovered (which Hypothesis would call flaky).
        """
        if test in self.failed:
            raise AssertionError(self.failed[test])
        if test not in self.started:
            check_healthy(self, "the tests before this one")
        if self.out_of_time(test):
            return
        try:
            run_batch(self, ops, client_only)
        except AssertionError as exc:
            self.failed[test] = f"(first seen in batch {self.batches}) {exc}{self.earlier()}"
            raise AssertionError(self.failed[test]) from None
        finally:
            self.history.append((self.batches, ops))

    def earlier(self) -> str:
        """The earlier batches that may have left the broker in a bad state: the last two, and every READY."""
        lines = []
        for n, ops in self.history[:-2]:
            lines += [f"  batch {n}: {op!r}"[:300] for op in ops if isinstance(op, WReady)]
        for n, ops in self.history[-2:]:
            lines.append(f"  batch {n}: {ops!r}"[:3000])
        return "\n\nEarlier batches (READYs, then the last two in full):\n" + "\n".join(lines[-40:]) if lines else ""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A dedicated ``serve`` with one real English Piper worker: fuzzing may break it, so it is nobody else's."""
    workers = f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\nstream_mode = "sentence"\n'
    # Short timeouts so that waiting requests end within a batch or two; a queue bound the
    # fuzzer cannot reach, so that no admission is refused for load (the duplicate-id check
    # relies on the first request of a pair being admitted).
    broker = f"request_timeout_ms = 3000\nstuck_timeout_ms = 3000\nmax_text_chars = {MAX_TEXT}\nmax_queue = 100000\n"
    s = start_serve(tmp_path_factory.mktemp("fuzz"), workers, broker)
    try:
        wait_services(s.frontend, ["tts"], timeout=60)
        yield Fuzzed(s)
    finally:
        rc = stop_serve(s)
        assert rc == 0, f"serve exited with {rc}; log:\n{s.log_text()[-3000:]}"


def log_excerpt(text: str, needle: str) -> str:
    i = text.find(needle)
    return text[max(0, i - 1500) : i + 2500]


def log_problem(fz: Fuzzed, after: str) -> Optional[str]:
    """A traceback (broker or worker) or a stopped broker loop in the part of the log not yet checked."""
    text = fz.new_log()
    for bad in ("Traceback", "broker stopped"):
        if bad in text:
            return f"{bad!r} in the serve log after {after}:\n{log_excerpt(text, bad)}"
    return None


def check_log(fz: Fuzzed, after: str) -> None:
    problem = log_problem(fz, after)
    if problem:
        raise AssertionError(problem)


def check_healthy(fz: Fuzzed, after: str) -> None:
    """The broker answers MMI, a real request ends ``end`` with speech, ``serve`` runs, its log is clean."""
    proc = fz.served.proc
    assert proc.poll() is None, f"serve exited ({proc.returncode}) after {after}:\n{fz.served.log_text()[-3000:]}"
    check_log(fz, after)
    c = RawClient(fz.served.frontend)
    try:
        reply = c.call(b"mmi.service", b"tts", timeout=5)
        assert reply[3] == b"200", f"mmi.service tts answered {reply[3:]!r} after {after}"
        s = c.request(b"health", {"text": "Hello there."})
        deadline = time.monotonic() + 10
        while not s.done and time.monotonic() < deadline:
            c.recv(0.2)
        assert s.done, f"a real request got no FINAL within 10 s after {after}; got {s.names()}"
        s.check_invariants()
        final = s.events[-1][1]
        assert final[1] == b"end", f"a real request ended {final[1:]!r} after {after}"
        assert len(s.pcm()) > 0, f"a real request ended without audio after {after}"
    finally:
        c.close()
    check_log(fz, f"the health check after {after}")


# --------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------


@dataclass
class Tracked:
    """One TTS request id on the fuzzing client."""

    service: bytes
    request: list[bytes]
    """The body frames sent (for the report)."""
    must_answer: bool
    """The frames are a valid REQUEST with a usable id: PROTOCOL.md promises one FINAL."""
    sends: int = 1
    stream: RawStream = field(default_factory=RawStream)
    late: list[tuple[bool, list[bytes]]] = field(default_factory=list)
    """Replies that came after the FINAL."""


class FuzzClient:
    """A DEALER that sends anything and keeps account of what came back."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.n = 0
        self.sent = 0
        self.slept = 0.0
        self.violations: list[str] = []
        self._open()

    def _open(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.tts: dict[bytes, Tracked] = {}
        self.cancels_sent: Counter[bytes] = Counter()
        self.cancel_replies: defaultdict[bytes, list[list[bytes]]] = defaultdict(list)
        self.calls_sent: Counter[bytes] = Counter()
        self.must_calls: Counter[bytes] = Counter()
        self.call_replies: defaultdict[bytes, list[tuple[bool, list[bytes]]]] = defaultdict(list)

    def reconnect(self) -> None:
        """Vanish with whatever is in flight (the broker must cope) and come back as a new client."""
        self.pump(0.02)
        self.check(final=False)
        self.sock.close(linger=0)
        self._open()

    def send(self, frames: list[bytes]) -> None:
        self.sent += 1
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def fresh_rid(self, kind: str) -> bytes:
        self.n += 1
        tag = b"%d" % self.n
        return {
            "ascii": b"r" + tag,
            "binary": b"\xff\x00\xfe" + tag,
            "max": (b"m" + tag).ljust(255, b"\x00"),
            "empty": b"",
            "long": (b"l" + tag).ljust(256, b"x"),
            "huge": (b"h" + tag).ljust(5000, b"y"),
        }[kind]

    def request(self, frames: list[bytes]) -> None:
        """Send and account for one client message, valid or not."""
        valid = len(frames) >= 4 and frames[0] == MDPC and frames[1] == b"\x01" and valid_service_name(frames[2])
        if len(frames) >= 3 and frames[0] == MDPC and frames[1] == b"\x01":
            service = frames[2]
            if is_tts_service(service) and len(frames) >= 4:
                rid = frames[3]
                t = self.tts.get(rid)
                if t is None:
                    self.tts[rid] = Tracked(service, frames[3:], valid and 1 <= len(rid) <= 255)
                else:
                    t.sends += 1
                    t.must_answer |= valid and 1 <= len(rid) <= 255
            elif service == b"tts.cancel" and valid:
                self.cancels_sent[frames[3]] += 1
            elif not is_tts_service(service):
                self.calls_sent[service] += 1
                if valid and (service.startswith(b"mmi.") or service == b"tts.status"):
                    self.must_calls[service] += 1
        self.send(frames)

    def pump(self, timeout: float) -> bool:
        """Read every reply that arrives within ``timeout``; False if none did."""
        got = False
        while self.sock.poll(timeout * 1000 if not got else 0):
            got = True
            self._on_reply(self.sock.recv_multipart())
        return got

    def _on_reply(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[0] != MDPC or frames[1] not in (b"\x02", b"\x03"):
            self.violations.append(f"malformed reply {frames[:4]!r}")
            return
        service, final, body = frames[2], frames[1] == b"\x03", frames[3:]
        if is_tts_service(service):
            t = self.tts.get(body[0]) if body else None
            if t is None:
                self.violations.append(f"reply for a TTS request never sent (or with an id that cannot be answered): {frames[:5]!r}")
            elif t.service != service:
                self.violations.append(f"request {body[0][:40]!r} to {t.service!r} answered as {service!r}")
            elif t.stream.done:
                t.late.append((final, body))
            else:
                t.stream.events.append((final, body))
        elif service == b"tts.cancel":
            self.cancel_replies[body[0] if body else b""].append(frames[1:])
        else:
            self.call_replies[service].append((final, body))

    def open_rids(self) -> list[bytes]:
        return [rid for rid, t in self.tts.items() if t.must_answer and not t.stream.done]

    def settle(self) -> None:
        """Let streams run briefly, cancel what is left, and read until every request is answered and all is quiet."""
        deadline = time.monotonic() + 1.0
        while self.open_rids() and time.monotonic() < deadline:
            self.pump(0.05)
        for rid in self.open_rids():
            self.cancels_sent[rid] += 1
            self.send([MDPC, b"\x01", b"tts.cancel", rid])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not self.pump(0.15) and not self.open_rids():
                break

    def check(self, final: bool = True, client_only: bool = False) -> None:
        v = self.violations
        for rid, t in self.tts.items():
            names = summary(t.stream.events)
            who = f"request {rid[:40]!r} to {t.service!r}, body {[f[:150] for f in t.request[1:]]!r}" + (f" (id sent {t.sends} times)" if t.sends > 1 else "")
            if t.late:
                v.append(f"{who}: got [{names}] and then, after its FINAL, [{summary(t.late)}]")
            if not t.stream.events:
                if final and t.must_answer:
                    v.append(f"{who} never got a FINAL (not even after tts.cancel)")
                continue
            if not t.stream.done:
                if final:
                    v.append(f"{who} got {names} and no FINAL")
                continue
            try:
                t.stream.check_invariants()
            except AssertionError as exc:
                v.append(f"{who}: {exc}")
            last = t.stream.events[-1][1]
            if last[1:2] == [b"error"]:
                try:
                    err = json.loads(last[2])
                    code = err["code"]
                except Exception:
                    v.append(f"{who}: unreadable error FINAL {last[1:]!r}")
                    continue
                if code not in ERROR_CODES:
                    v.append(f"{who}: undocumented error code {code!r}")
                if client_only and code == "internal":
                    v.append(f"{who}: the only (real) engine failed on admitted input: {err}")
            elif last[1:2] != [b"end"]:
                v.append(f"{who}: FINAL is {last[1:2]!r}, not end or error")
        for rid, n in self.cancels_sent.items():
            replies = self.cancel_replies.get(rid, [])
            if final and len(replies) != n or len(replies) > n:
                v.append(f"tts.cancel {rid[:40]!r}: sent {n}, got {len(replies)} replies: {replies[:3]!r}")
            for r in replies:
                if r[0] != b"\x03" or r[3:] not in ([b"cancelled"], [b"unknown"]):
                    v.append(f"tts.cancel {rid[:40]!r}: odd reply {r!r}")
        for service, replies in self.call_replies.items():
            finals = sum(f for f, _ in replies)
            if finals > self.calls_sent[service]:
                v.append(f"{service[:40]!r}: {finals} FINALs for {self.calls_sent[service]} requests")
            if service.startswith(b"mmi.") or service == b"tts.status":
                if any(not f for f, _ in replies):
                    v.append(f"{service[:40]!r}: a PARTIAL from a broker service")
                for _, body in replies:
                    if service == b"mmi.service" and body not in ([b"200"], [b"404"]):
                        v.append(f"mmi.service answered {body!r}")
                    elif service.startswith(b"mmi.") and service != b"mmi.service" and body != [b"501"]:
                        v.append(f"{service!r} answered {body!r}, not 501")
                    elif service == b"tts.status":
                        try:
                            assert isinstance(json.loads(body[0]), dict) and len(body) == 1
                        except Exception:
                            v.append(f"tts.status answered {body[:2]!r}")
        if final:
            for service, n in self.must_calls.items():
                finals = sum(f for f, _ in self.call_replies.get(service, []))
                if finals != n:
                    v.append(f"{service[:40]!r}: {n} valid requests, {finals} FINALs")

    def close(self) -> None:
        self.sock.close(linger=0)


class FakeWorker:
    """A DEALER on the backend that says whatever it is told to."""

    def __init__(self, endpoint: str, identity: Optional[bytes]) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)
        self.jobs: list[tuple[bytes, list[bytes]]] = []
        self.sent = 0

    def send(self, frames: list[bytes]) -> None:
        self.sent += 1
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def pump(self, timeout: float) -> None:
        while self.sock.poll(timeout * 1000):
            timeout = 0
            frames = self.sock.recv_multipart()
            if frames[:2] == [MDPW, b"\x02"] and len(frames) >= 4:
                if frames[4:] != [b"tts.cancel"]:
                    self.jobs.append((frames[2], frames[4:]))

    def close(self) -> None:
        self.send([MDPW, b"\x06"])
        self.sock.close(linger=50)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

controls = st.sampled_from([chr(i) for i in range(32)] + ["\x7f", "\x85", "\u2028", "\u200b", "\ufeff", "\ufffe", "\U0010ffff"])
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
text_chars = st.one_of(st.characters(), controls, surrogates, st.sampled_from(list("Hello there. ")))
fuzz_text = st.one_of(
    st.text(text_chars, max_size=16),
    st.tuples(st.sampled_from(["Hello", "Hi there.", "Ok", ""]), st.text(text_chars, max_size=4), st.sampled_from(["", " now.", "?"])).map("".join),
    # Speakable words around characters that are not text: control characters, lone surrogates.
    st.tuples(st.sampled_from(["Hello ", "", "Hi."]), st.text(controls | surrogates, min_size=1, max_size=3), st.sampled_from(["", " there.", "x"])).map("".join),
    # At the length limit (padded with spaces: quick to speak) and just over it.
    st.integers(MAX_TEXT - 1, MAX_TEXT + 2).map(lambda n: "Hi." + " " * (n - 3)),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(text_chars, max_size=8)
)
json_any = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(text_chars, max_size=6), c, max_size=3), max_leaves=6
)


def either(*values: object) -> st.SearchStrategy:
    return st.sampled_from(values) | json_any


valid_fields = {
    "language": st.sampled_from(["en", "en-US", "en_US", "EN", "pt-BR", "zz", "fz", "zh-Hant-TW"]),
    "voice": st.just(EN_VOICE),
    "engine": st.just("piper"),
    "format": st.sampled_from(["s16le", "f32le"]),
    "sample_rate": st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    "chunk_ms": st.sampled_from([10, 20, 40, 1000]),
    "speed": st.sampled_from([0.26, 1, 1.5, 4]),
    "stream": st.sampled_from(["frames", "sentence"]),
}
odd_values = {
    "text": st.sampled_from(["", " \n\t ", "x" * (MAX_TEXT + 1)]) | json_any,
    "language": either("e", "", "en US", "x" * 300, "en-", "12"),
    "voice": either("", "x" * 201, "pt_BR-tinyfixture-x_low", EN_VOICE.upper(), "nobody", "fuzz"),
    "engine": either("festival", "", "PIPER", "xtts"),
    "format": either("wav", "", "S16LE"),
    "sample_rate": either(7999, 48001, 0, -1, 2**64, 16000.0, 16000.5, "16000", True),
    "chunk_ms": either(9, 1001, 40.0, 0, -40, 2**63, False),
    "speed": either(0.25, 0.2500001, 4.0000001, 0, -1, 1e308, math.nan, math.inf, -math.inf, "1"),
    "stream": either("", "bytes", "FRAMES"),
}
valid_objects = st.builds(lambda text, rest: {"text": text, **rest}, fuzz_text, st.fixed_dictionaries({}, optional=valid_fields))
request_objects = st.one_of(
    valid_objects,
    valid_objects,
    valid_objects,
    # One field wrong, or one key unknown: each must be refused on its own.
    st.builds(lambda obj, odd: {**obj, **odd}, valid_objects, st.dictionaries(st.sampled_from(sorted(odd_values)), json_any, min_size=1, max_size=1)),
    st.builds(
        lambda obj, kv: {**obj, kv[0]: kv[1]},
        valid_objects,
        st.sampled_from(sorted(odd_values)).flatmap(lambda k: odd_values[k].map(lambda v: (k, v))),
    ),
    st.builds(lambda obj, extra: {**obj, **extra}, valid_objects, st.dictionaries(st.text(text_chars, max_size=8), json_any, min_size=1, max_size=2)),
    # Anything at all.
    st.dictionaries(st.sampled_from([*sorted(odd_values), "Text", "text "]), json_any, max_size=4),
)


def encode(obj: object, how: str) -> bytes:
    if how == "ascii":
        return json.dumps(obj).encode()
    if how == "utf8":  # lone surrogates as raw (invalid UTF-8) bytes
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return b"\xef\xbb\xbf" + json.dumps(obj).encode()  # with a BOM


odd_bodies = st.sampled_from(
    [
        b"", b"null", b"[]", b"{}", b'"hi"', b'{"text":"hi"', b"[" * 5000, b'{"text": "hi", "text": "ho"}',
        '{"text": "hi"}'.encode("utf-16"), b'{"text": "\\ud800"}', b'{"text": "\\udfff\\ud800 x"}',
        b'{"text": "a\\u0000b"}', b'{"text": "hi", "speed": NaN}', b'{"text": "hi", "chunk_ms": 1e400}',
        b'{"text": "hi", "sample_rate": 16000.0}', b'{"text": "\xff\xfe"}',
    ]
)
encoded_requests = st.builds(encode, request_objects, st.sampled_from(["ascii", "ascii", "ascii", "utf8", "bom"]))
tts_bodies = st.one_of(
    encoded_requests,
    encoded_requests,
    encoded_requests,
    encoded_requests,
    odd_bodies,
    st.binary(max_size=40),
)
service_names = st.one_of(
    st.sampled_from([b"tts", EN_SERVICE, FAKE_VOICE_SERVICE, b"xtts", b"tts.cancel", b"tts.status", b"mmi.service", b"mmi.fz", OPAQUE]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12).map(str.encode),
    st.binary(max_size=12),
    st.sampled_from([b"x" * 255, b"x" * 256, b"x" * 4000, b"tts ", b" tts", b"TTS", b"tts\x00", b"piper.", b"xtts\xff", b"mmi.", b"piper." + b"v" * 249]),
)
frames_any = st.lists(st.binary(max_size=24), min_size=1, max_size=8)


class CRaw(NamedTuple):
    frames: list[bytes]


class CMutant(NamedTuple):
    header: bytes
    command: bytes
    service: bytes
    body: list[bytes]


class CTts(NamedTuple):
    service: bytes
    rid: str
    body: bytes
    shape: str
    extra: list[bytes]


class CDuplicate(NamedTuple):
    """A valid request, then another with the same id while the first is in flight."""

    body: bytes


class CCancel(NamedTuple):
    which: int
    """Index into the ids sent so far; -1: an id never sent."""


class CCall(NamedTuple):
    service: bytes
    body: list[bytes]


class CReconnect(NamedTuple):
    pass


class Sleep(NamedTuple):
    seconds: float


ClientOp = Union[CRaw, CMutant, CTts, CDuplicate, CCancel, CCall, CReconnect, Sleep]

c_raw = st.builds(CRaw, frames_any)
c_mutant = st.builds(
    CMutant,
    st.sampled_from([MDPC, b"MDPC01", MDPW, b"", b"MDPC02\x00", b"mdpc02"]) | st.binary(max_size=8),
    st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x00", b"\x01\x00", b"", b"\xff"]) | st.binary(max_size=2),
    service_names,
    st.lists(st.binary(max_size=24) | tts_bodies, max_size=4),
)
c_tts = st.builds(
    CTts,
    st.sampled_from([b"tts"] * 6 + [EN_SERVICE, EN_SERVICE, FAKE_VOICE_SERVICE, b"xtts", b"piper.", b"xtts.fz"]),
    st.sampled_from(["ascii"] * 6 + ["binary", "max", "empty", "long", "huge"]),
    tts_bodies,
    st.sampled_from(["ok"] * 8 + ["no_json", "extra", "no_body"]),
    st.lists(st.binary(max_size=16), max_size=2),
)
c_duplicate = st.builds(CDuplicate, tts_bodies)
c_cancel = st.builds(CCancel, st.integers(-1, 8))
c_call = st.one_of(
    st.builds(CCall, st.just(b"mmi.service"), st.lists(service_names, min_size=1, max_size=2)),
    st.builds(CCall, st.sampled_from([b"mmi.fz", b"mmi.", b"mmi.service.x"]), frames_any),
    st.builds(CCall, st.just(b"tts.status"), st.lists(st.binary(max_size=8), min_size=1, max_size=2)),
    st.builds(CCall, st.sampled_from([OPAQUE, b"fz.nobody", b"piper", b"tts.statu"]), frames_any),
)
sleeps = st.builds(Sleep, st.sampled_from([0.01, 0.05, 0.2]))

client_ops = st.one_of(c_tts, c_tts, c_tts, c_tts, c_tts, c_tts, c_duplicate, c_cancel, c_call, c_mutant, c_raw, st.just(CReconnect()), sleeps)


def run_client_op(c: FuzzClient, op: ClientOp) -> None:
    if isinstance(op, CRaw):
        c.request(op.frames)
    elif isinstance(op, CMutant):
        body = list(op.body)
        if is_tts_service(op.service) and body:  # an attributable id, still odd bytes
            body[0] = body[0][:200] + b"#m%d" % c.n
            c.n += 1
        c.request([op.header, op.command, op.service, *body])
    elif isinstance(op, CTts):
        rid = c.fresh_rid(op.rid)
        body = {"ok": [rid, op.body], "no_json": [rid], "extra": [rid, op.body, *op.extra, b""], "no_body": []}[op.shape]
        c.request([MDPC, b"\x01", op.service, *body])
    elif isinstance(op, CDuplicate):
        rid = c.fresh_rid("ascii")
        c.request([MDPC, b"\x01", b"tts", rid, json.dumps({"text": "Hello there. This one is still talking."}).encode()])
        c.request([MDPC, b"\x01", b"tts", rid, op.body])
    elif isinstance(op, CCancel):
        rids = list(c.tts)
        rid = rids[op.which % len(rids)] if rids and op.which >= 0 else b"never-%d" % c.n
        c.request([MDPC, b"\x01", b"tts.cancel", rid])
    elif isinstance(op, CCall):
        c.request([MDPC, b"\x01", op.service, *op.body])
    elif isinstance(op, CReconnect):
        c.reconnect()
    elif isinstance(op, Sleep):
        if c.slept + op.seconds <= 1.0:  # bounded per batch
            c.slept += op.seconds
            c.pump(op.seconds)


# Fake workers --------------------------------------------------------------


class WNew(NamedTuple):
    identity: Union[bytes, str, None]
    """Routing id: ZeroMQ's own (None), these bytes, or "steal": the real worker's id as tts.status shows it."""


class WReady(NamedTuple):
    k: int
    service: bytes
    caps: Optional[bytes]
    extra: list[bytes]


class WRaw(NamedTuple):
    k: int
    frames: list[bytes]


class WReply(NamedTuple):
    """Answer the next job this worker was given (or a made-up one) with these events."""

    k: int
    events: list[tuple[str, str, str, list[bytes]]]
    """(command: natural/flip/odd, address: job/other/empty, request id: job/other, frames after the id)."""


class WBeat(NamedTuple):
    k: int
    frames: list[bytes]


WorkerOp = Union[WNew, WReady, WRaw, WReply, WBeat]

good_caps = st.fixed_dictionaries(
    {
        "protocol": st.just("tts/1"),
        "engine": st.sampled_from(["piper", "xtts"]),
        "languages": st.lists(st.sampled_from(["en", "fz", "pt", "zz"]), max_size=3),
        "voices": st.lists(st.sampled_from([EN_VOICE, "fuzz", "fz_FZ-fuzz-low"]), max_size=2),
    },
    optional={
        "sample_rate": either(22050, 16000),
        "pid": either(1, os.getpid()),
        "host": either("fuzz"),
        "voice": either("fuzz"),
        "stream": either("frames"),
        "device": either("cpu"),
    },
)
caps_frames = st.one_of(
    good_caps.map(json.dumps).map(str.encode),
    st.builds(lambda caps, key, value: {**caps, key: value}, good_caps, st.sampled_from(["protocol", "engine", "languages", "voices", "sample_rate"]), json_any)
    .map(json.dumps)
    .map(str.encode),
    st.none(),
    good_caps.map(json.dumps).map(str.encode),
    st.just(b'{"protocol": "tts/1", "languages": ["en"], "voices": [1, {"a": 1}]}'),
    json_any.map(json.dumps).map(str.encode),
    st.binary(max_size=24),
)
worker_services = st.one_of(
    st.sampled_from([EN_SERVICE, EN_SERVICE, EN_SERVICE, FAKE_VOICE_SERVICE, FAKE_VOICE_SERVICE, b"xtts", OPAQUE, b"tts", b"tts.status", b"mmi.service", b"piper."]),
    st.sampled_from([EN_SERVICE, FAKE_VOICE_SERVICE, b"xtts", OPAQUE]),
    service_names,
)

good_start = st.fixed_dictionaries(
    {
        "sample_rate": either(22050, 16000, 8000, 48001),
        "format": either("s16le", "f32le", "wav"),
        "engine": either("piper", "xtts"),
        "voice": either("fuzz"),
        "worker": either({"pid": 1}, {}),
    },
    optional={"channels": either(1, 2)},
).map(json.dumps).map(str.encode)
json_frames = json_any.map(json.dumps).map(str.encode)
events = st.one_of(
    st.tuples(st.just(b"start"), good_start | json_frames | st.binary(max_size=8)).map(list),
    st.tuples(
        st.just(b"audio"),
        st.sampled_from([b"\x00\x00\x00\x00", b"\x00\x00\x00\x01", b"\xff\xff\xff\xff"]) | st.binary(max_size=6),
        st.integers(0, 64).map(lambda n: b"\x01" * n) | st.binary(max_size=16),
    ).map(list),
    st.builds(lambda end: [b"mark", json.dumps({"end": end}).encode()], st.integers(-3, MAX_TEXT + 3) | json_any),
    st.tuples(st.just(b"end"), st.just(b"{}") | json_frames).map(list),
    st.builds(
        lambda code, msg: [b"error", json.dumps({"code": code, "message": msg}).encode()],
        st.sampled_from(sorted(ERROR_CODES)) | json_any,
        json_any,
    ),
    st.lists(st.binary(max_size=12), max_size=3),
)
reply_event = st.tuples(
    st.sampled_from(["natural"] * 6 + ["flip", "odd"]),
    st.sampled_from(["job"] * 6 + ["other", "empty"]),
    st.sampled_from(["job"] * 6 + ["other"]),
    events,
)
valid_stream = st.just(
    [
        ("natural", "job", "job", [b"start", b'{"sample_rate": 22050, "format": "s16le", "engine": "piper", "voice": "fuzz", "worker": {"pid": 1}}']),
        ("natural", "job", "job", [b"audio", b"\x00\x00\x00\x00", b"\x00\x01" * 32]),
        ("natural", "job", "job", [b"mark", b'{"end": 3}']),
        ("natural", "job", "job", [b"end", b"{}"]),
    ]
)

w_ready = st.builds(WReady, st.integers(0, 2), worker_services, caps_frames, st.just([]) | st.lists(st.binary(max_size=8), max_size=1))
w_reply = st.builds(WReply, st.integers(0, 2), st.lists(reply_event, min_size=1, max_size=5) | valid_stream)
worker_ops = st.one_of(
    w_ready,
    w_reply,
    w_ready,
    st.builds(WNew, st.none() | st.binary(min_size=1, max_size=8).map(lambda b: b"f" + b) | st.just("steal")),
    st.builds(WRaw, st.integers(0, 2), frames_any),
    w_reply,
    w_ready,
    st.builds(WBeat, st.integers(0, 2), st.sampled_from([[MDPW, b"\x05"], [MDPW, b"\x06"], [MDPW, b"\x05", b""], [MDPW, b"\x07"], [MDPW, b"\x01"]])),
)
# Client traffic that reaches the fake workers: mostly valid requests to the services they register.
valid_bodies = st.builds(
    lambda text, lang, voice: json.dumps({"text": text, **lang, **voice}).encode(),
    st.sampled_from(["Hi.", "Hello there. Again.", "Ok?"]),
    st.sampled_from([{}, {"language": "fz"}, {"language": "zz"}, {"language": "pt-BR"}]),
    st.sampled_from([{}, {"voice": "fuzz"}, {"voice": EN_VOICE}, {"voice": "nobody"}]),
)
c_tts_to_fakes = st.builds(
    CTts,
    st.sampled_from([b"tts", b"tts", EN_SERVICE, FAKE_VOICE_SERVICE, b"xtts"]),
    st.just("ascii"),
    valid_bodies | tts_bodies,
    st.just("ok"),
    st.just([]),
)
mixed_ops = st.one_of(
    worker_ops,
    c_tts_to_fakes,
    worker_ops,
    c_tts_to_fakes,
    worker_ops,
    c_duplicate,
    c_cancel,
    st.builds(CCall, st.just(OPAQUE), frames_any),
    st.builds(CCall, st.just(b"mmi.service"), st.lists(worker_services, min_size=1, max_size=1)),
    sleeps,
    st.builds(Sleep, st.just(0.8)),
)


def real_worker_ids(frontend: str) -> list[bytes]:
    c = RawClient(frontend)
    try:
        status = json.loads(c.call(b"tts.status", b"{}")[3])
    finally:
        c.close()
    return [w["id"].encode() for svc in status["services"].values() for w in svc["workers"] if w.get("pid") not in (None, 1, os.getpid())]


def run_worker_op(fz: Fuzzed, fakes: list[FakeWorker], op: WorkerOp) -> None:
    if isinstance(op, WNew):
        identity = op.identity
        if identity == "steal":
            ids = real_worker_ids(fz.served.frontend)
            identity = ids[0] if ids else None
        if len(fakes) < 3:
            fakes.append(FakeWorker(fz.served.backend, identity))  # type: ignore[arg-type]
        return
    if not fakes:
        fakes.append(FakeWorker(fz.served.backend, None))
    w = fakes[op.k % len(fakes)]
    if isinstance(op, WReady):
        w.send([MDPW, b"\x01", op.service, *([op.caps] if op.caps is not None else []), *op.extra])
    elif isinstance(op, (WRaw, WBeat)):
        w.send(op.frames)
    elif isinstance(op, WReply):
        w.pump(0.03)
        address, body = w.jobs.pop(0) if w.jobs else (b"no-such-job", [b"r1"])
        rid = body[0] if body else b""
        for command, addr, rid_kind, frames in op.events:
            natural = b"\x04" if frames[:1] in ([b"end"], [b"error"]) else b"\x03"
            cmd = {"natural": natural, "flip": b"\x03" if natural == b"\x04" else b"\x04", "odd": b"\x08"}[command]
            a = {"job": address, "other": b"x" + address, "empty": b""}[addr]
            w.send([MDPW, cmd, a, b"", rid if rid_kind == "job" else b"other-id", *frames])


def run_batch(fz: Fuzzed, ops: list, client_only: bool) -> None:
    fz.batches += 1
    c = FuzzClient(fz.served.frontend)
    fakes: list[FakeWorker] = []
    try:
        for op in ops:
            if isinstance(op, (WNew, WReady, WRaw, WReply, WBeat)):
                run_worker_op(fz, fakes, op)
            else:
                run_client_op(c, op)
            for w in fakes:
                w.pump(0)
        for w in fakes:
            w.close()
            fz.messages += w.sent
        fakes.clear()
        c.settle()
        c.check(client_only=client_only)
        problem = log_problem(fz, f"batch {fz.batches}")
        if problem:
            c.violations.append(problem)
        fz.messages += c.sent
        if c.violations:
            raise AssertionError("\n".join(c.violations[:10]))
    finally:
        for w in fakes:
            w.close()
        c.close()
    check_healthy(fz, f"batch {fz.batches}")


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------


def test_broker_is_healthy_before_fuzzing(fuzzed: Fuzzed) -> None:
    check_healthy(fuzzed, "start-up")


@FUZZ
@given(ops=st.lists(st.one_of(c_raw, c_mutant, c_call, st.just(CReconnect())), min_size=20, max_size=50))
def test_fuzz_client_frames(fuzzed: Fuzzed, ops: list[ClientOp]) -> None:
    """Random and mutated MDP messages from clients."""
    fuzzed.batch("client_frames", ops, client_only=True)


@FUZZ
@given(ops=st.lists(client_ops, min_size=15, max_size=40))
def test_fuzz_client_tts_bodies(fuzzed: Fuzzed, ops: list[ClientOp]) -> None:
    """Random and mutated TTS requests, cancels and status requests, with only the real engine behind the broker."""
    fuzzed.batch("client_tts", ops, client_only=True)


@FUZZ
@given(ops=st.lists(mixed_ops, min_size=10, max_size=40))
def test_fuzz_fake_workers(fuzzed: Fuzzed, ops: list) -> None:
    """Fake workers: random frames, READYs with random services and capabilities, random replies to real jobs."""
    fuzzed.batch("fake_workers", ops, client_only=False)


def test_broker_survived_the_fuzzing(fuzzed: Fuzzed) -> None:
    print(f"fuzzed {fuzzed.batches} batches, {fuzzed.messages} messages")
    check_healthy(fuzzed, "all the fuzzing")
    assert fuzzed.served.proc.poll() is None
    log = fuzzed.served.log_text()
    assert "Traceback" not in log and "broker stopped" not in log, log_excerpt(log, "Traceback")
