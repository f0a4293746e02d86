"""tts-broker: an MDP/0.2 (ZeroMQ RFC 18) broker for streaming text-to-speech."""

__version__ = "0.1.0"
