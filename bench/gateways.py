"""First audio through the gateways: each against the ZeroMQ client on the same broker, and our
Wyoming gateway against wyoming-piper on the same voice, all in one run, interleaved.

One ``tts-broker serve`` as it ships (one Piper worker on the bundled voice) with both gateways
on (``--wyoming``, ``--http``), and wyoming-piper 2.5.2 beside it (bench/peer.py starts both).
Each request is timed at its client from just before it is sent to its first audio:

* ``zmq`` — the Python client (bench/peer.py's ``Ours``: a connected client per thread);
* ``wyoming_gw`` — our Wyoming gateway through the ``wyoming`` package's framing, a fresh
  connection per request made before the clock starts (bench/peer.py's ``Wyoming``, as for
  wyoming-piper);
* ``http_gw`` — ``POST /v1/audio/speech`` on a kept-alive HTTP/1.1 connection (the standard
  library's client), ``pcm`` at the voice's own rate (``sample_rate`` 22050) so that the broker
  does the same work as for the ZeroMQ client; first audio = the first body bytes;
* ``wyoming_piper`` — the peer.

``wyoming_ttfa_ratio`` and ``http_ttfa_ratio`` = gateway ÷ ZeroMQ on the 3-sentence passage
(the gateway's own cost: one more hop and a protocol translation); the short line is reported
too. ``gateway_peer_short_ratio`` / ``gateway_peer_long_ratio`` = our Wyoming gateway ÷
wyoming-piper on "Halt! Who goes there?" and on the 47-word sentence.

Each ratio is the median, over the repetitions, of the two sides' ratio within one rotation
(requests a second or two apart), as ``timings_ttfa_ratio`` is (bench/ttfa.py); the p50s are
kept as context. This machine's first audio is bimodal over a run: stretches where the passage
takes ~31 ms and stretches where it takes ~45 ms, whoever asks (a loop of numpy matrix
products alone shows the same: 60 ms a pass, with stretches of ~10 s at 85 ms). A p50 sits
between the two, so a side that drew two more slow stretches than another moved it by 10 ms:
in one 40-repetition run, the p50s gave the HTTP gateway 1.176 and the paired ratios 1.038
(Wyoming 1.118 and 1.031), while within the fast stretches the gateways cost 1-2 ms.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from typing import Any

from .common import endpoint, percentile
from .peer import SHORT, Heard, Wyoming, _Player, _servers
from .peer_env import VOICE
from .ttfa import LONG_SENTENCE, SETTLE_S, TEXT

RATE = 22050


class Http:
    """The HTTP gateway on one kept-alive connection (made, and used once, before it is timed)."""

    name = "http_gw"

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def speak(self, text: str) -> Heard:
        body = json.dumps({"model": "tts-1", "voice": VOICE, "input": text, "response_format": "pcm", "sample_rate": RATE})
        t0 = time.perf_counter()
        player = _Player(t0)
        self.conn.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP gateway answered {resp.status}: {resp.read()[:300]!r}")
        odd = 0
        while piece := resp.read1(65536):
            odd += len(piece)
            player.chunk((odd // 2) / RATE)
            odd %= 2
        return player.heard()

    def close(self) -> None:
        self.conn.close()


def _summary(heard: list[Heard]) -> dict[str, float]:
    firsts = [h.first * 1000 for h in heard]
    return {"p50": round(statistics.median(firsts), 1), "p90": round(percentile(firsts, 90), 1), "n": len(firsts)}


def run(reps: int = 10) -> dict[str, Any]:
    wy_port, http_port = (int(endpoint().rsplit(":", 1)[1]) for _ in range(2))
    serve_args = ("--wyoming", f"tcp://127.0.0.1:{wy_port}", "--http", f"127.0.0.1:{http_port}")
    # Which sides speak each case: every side the passage and the short line; the long
    # sentence only matters against wyoming-piper (and the ZeroMQ client, for context).
    cases = {
        "passage": (TEXT, ("zmq", "wyoming_gw", "http_gw")),
        "short": (SHORT, ("zmq", "wyoming_gw", "http_gw", "wyoming_piper")),
        "long": (LONG_SENTENCE, ("zmq", "wyoming_gw", "wyoming_piper")),
    }
    rows: dict[str, dict[str, list[Heard]]] = {case: {side: [] for side in sides} for case, (_, sides) in cases.items()}
    with _servers(None, serve_args, (wy_port, http_port)) as (peers, _pids):
        http_gw = Http(http_port)
        speakers = {"zmq": peers["ours"], "wyoming_gw": Wyoming(wy_port, "the Wyoming gateway"), "http_gw": http_gw, "wyoming_piper": peers["wyoming"]}
        try:
            for name in ("wyoming_gw", "http_gw"):  # the first request of each pays for lazy set-up
                speakers[name].speak("Ready.")
                speakers[name].speak(TEXT)
            for rep in range(reps):
                for case, (text, sides) in cases.items():
                    k = rep % len(sides)  # rotate who goes first
                    for side in sides[k:] + sides[:k]:
                        rows[case][side].append(speakers[side].speak(text))
                        time.sleep(SETTLE_S)
        finally:
            http_gw.close()

    out: dict[str, Any] = {"voice": VOICE, "reps": reps, "first_ms": {case: {side: _summary(h) for side, h in by.items()} for case, by in rows.items()}}

    def ratio(case: str, a: str, b: str) -> float:
        return round(statistics.median(x.first / y.first for x, y in zip(rows[case][a], rows[case][b])), 3)

    out["wyoming_ttfa_ratio"] = ratio("passage", "wyoming_gw", "zmq")
    out["http_ttfa_ratio"] = ratio("passage", "http_gw", "zmq")
    out["wyoming_short_ttfa_ratio"] = ratio("short", "wyoming_gw", "zmq")
    out["http_short_ttfa_ratio"] = ratio("short", "http_gw", "zmq")
    out["gateway_peer_short_ratio"] = ratio("short", "wyoming_gw", "wyoming_piper")
    out["gateway_peer_long_ratio"] = ratio("long", "wyoming_gw", "wyoming_piper")
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 5), indent=1))
