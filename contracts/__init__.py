"""LLM Fleet's messages, subjects and streams. Depends on pydantic only."""

from contracts.catalog import CHANNELS, STREAMS, Channel, StreamSpec, dead_letter_subject
from contracts.events import Event

__all__ = ["CHANNELS", "STREAMS", "Channel", "Event", "StreamSpec", "dead_letter_subject"]
