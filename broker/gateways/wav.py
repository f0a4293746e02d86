"""A WAV header for a stream whose length is not known when it starts.

The header goes out before the first sample, so its sizes cannot be known:
they are set to 0xFFFFFFFF ("as long as the file"), as OpenAI's streamed WAV
does. libsndfile, Python's ``wave`` (which reads to the end of the data) and
browsers accept it, and the audio is playable while it is still arriving.
"""

from __future__ import annotations

import struct

UNKNOWN = 0xFFFFFFFF


def streaming_header(sample_rate: int, channels: int = 1, sample_width: int = 2) -> bytes:
    """The 44-byte RIFF/WAVE header of 16-bit (``sample_width`` 2) integer PCM, sizes unknown."""
    block = channels * sample_width
    return (
        b"RIFF" + struct.pack("<I", UNKNOWN) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 8 * sample_width)
        + b"data" + struct.pack("<I", UNKNOWN)
    )
