"""Errors a user can act on. Frontends print their message as one sentence, never a traceback."""


class UserError(Exception):
    """Something about the input, the files or the machine that the user can fix."""


class VoiceError(UserError, ValueError):
    """A voice prompt file the model cannot use."""
