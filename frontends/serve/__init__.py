"""`ppx-serve`, the websocket daemon, in the parts its files name: `cli` (flags, checks, start-up),
`scheduler` (the tick thread that owns the engine), `session` (an `/api/chat` client: pacing,
outbox, codec threads), `voices` (voices loaded off the tick thread and kept), `http` (auth,
health, metrics, static files, request limits), `tls`, and `server`, which wires them."""
from .cli import build_parser, main  # noqa: F401
