"""Voice prompts: the voice library, `.pt` files, and voices made from recordings."""
from .library import (  # noqa: F401
    UnknownVoice, VoiceLibrary, encode_voice, hub_voice_dir, load_voice, read_voice, resolve_voice_arg,
)
