"""`ppx-serve`'s command line: the flags (named as the reference's where it has them), the
checks made before the model loads, and start-up."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from engine.config import DEFAULT_TEXT_PROMPT
from engine.errors import UserError
from engine.sampling import SAMPLING_DEFAULTS

from ..common import add_model_args, cache_dir, load_engine, model_config, run_main, setup_logging

log = logging.getLogger("ppx.serve")

DESCRIPTION = """ppx-serve: the websocket daemon. Many live sessions share one GPU: a tick thread
gathers one 80 ms frame from every session that has one and runs them as one batched step.
/api/chat speaks the reference's protocol (the official PersonaPlex client works unchanged);
/ is a built-in page; /health, /metrics and /api/voices answer plain HTTP."""


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def step_threads(args) -> int:
    """Torch threads for a step on the CPU: the cores the codec threads leave (they run beside
    every tick, and intra-op threads that find no free core wait on each other), at least 1."""
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            raise UserError(f"--cpu-threads must be at least 1 (got {args.cpu_threads})")
        return args.cpu_threads
    return max(1, cpu_cores() - args.codec_threads)


def build_parser() -> argparse.ArgumentParser:
    d = SAMPLING_DEFAULTS
    ap = argparse.ArgumentParser(prog="ppx-serve", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="localhost", help="address to listen on (default localhost)")
    ap.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 picks a free one)")
    ap.add_argument("--ssl", type=str, help="directory with cert.pem and key.pem (a self-signed pair is made there "
                                            "when missing)")
    ap.add_argument("--static", type=str, help="serve another client's built files instead of the built-in page")
    ap.add_argument("--max-sessions", type=int, default=None,
                    help="concurrent sessions (default: as many as the GPU memory holds, 1 on the CPU)")
    ap.add_argument("--api-key", type=str, help="require this key (header X-API-Key, 'Authorization: Bearer', or "
                                                "?api_key=) before the websocket upgrade and for /api/voices; or "
                                                "set PPX_API_KEY")
    ap.add_argument("--voice-prompt", type=str, default=None, help="voice for sessions that name none")
    ap.add_argument("--voice-prompt-dir", type=str, help="directory of voice prompts (default: the hub's voices)")
    ap.add_argument("--text-prompt", type=str, default=DEFAULT_TEXT_PROMPT,
                    help="role prompt for sessions that send none")
    ap.add_argument("--seed", type=int, default=-1)
    ap.add_argument("--temp-audio", type=float, default=d.temp_audio)
    ap.add_argument("--temp-text", type=float, default=d.temp_text)
    ap.add_argument("--topk-audio", type=int, default=d.topk_audio)
    ap.add_argument("--topk-text", type=int, default=d.topk_text)
    ap.add_argument("--greedy", action="store_true")
    g = ap.add_argument_group("timing and limits")
    g.add_argument("--tick-deadline-ms", type=float, default=5.0,
                   help="a tick starts when every session has a frame, or when the oldest waiting frame has waited "
                        "this long (default 5 ms; under load ticks run back to back)")
    g.add_argument("--max-backlog-seconds", type=float, default=2.0,
                   help="how long an input frame may wait for its tick when the server falls behind real time; "
                        "older frames are dropped (counted in /metrics) so answers stay within this of the input "
                        "(default 2 s)")
    g.add_argument("--burst-seconds", type=float, default=8.0,
                   help="audio a client may send ahead of real time, e.g. what it held through a network stall; "
                        "more is refused as faster than real time (default 8 s)")
    g.add_argument("--client-buffer-seconds", type=float, default=5.0,
                   help="answers a client may leave unread on the server's side before it is dropped (default 5 s)")
    g.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close a session that sends no audio for this long, freeing its slot (default 300 s; "
                        "0: never)")
    g.add_argument("--codec-threads", type=int, default=max(1, min(8, cpu_cores() // 2)),
                   help="threads that Opus-encode the answers (default: half the CPU cores, at most 8, shared "
                        "among the --frontends processes; given, each frontend has that many)")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads of the model's step when --device is cpu (default: the cores the codec "
                        "threads leave, at least 1; threads beyond the free cores wait on each other)")
    g.add_argument("--drain-timeout", type=float, default=20.0,
                   help="after SIGTERM, how long live sessions may go on while no new ones are taken (default 20 s; "
                        "0: stop at once); SIGINT or a second SIGTERM stops at once")
    g.add_argument("--opus-complexity", type=int, default=5, choices=range(11), metavar="0-10",
                   help="Opus encoder complexity of the answers (default 5; from 7 up libopus also analyses the "
                        "signal, several times the host time per frame)")
    s = ap.add_argument_group("scale-out")
    s.add_argument("--gpus", type=str, default=None,
                   help="'all' or a list such as 0,1: one engine process per GPU behind the one port, each new "
                        "session placed on the GPU with the most free slots (--max-sessions is per GPU); with "
                        "--device cpu, a list runs that many engine processes on the CPU")
    s.add_argument("--frontends", type=int, default=1,
                   help="processes that run the sessions' websocket, Ogg and Opus work beside the one engine "
                        "process, on the one port (default 1: all in one process, which on a 16-core host kept "
                        "64 sessions in real time but not 128; with --gpus, per GPU)")
    s.add_argument("--agent-port", type=int, default=None,
                   help="also answer HAProxy's agent check on this TCP port: the share of free slots as a weight "
                        "('up 40%%'), 0%% when full or draining (deploy/haproxy)")
    s.add_argument("--log-tag", type=str, default=None, help=argparse.SUPPRESS)
    s.add_argument("--core-address", type=str, default=None, help=argparse.SUPPRESS)  # (a --frontends process)
    ap.add_argument("--kv-window", type=int, default=None, help="frames of history per session (default: the "
                                                                "model's full context)")
    ap.add_argument("--random-weights", action="store_true",
                    help="serve random weights of the --config shapes (benchmarks only: the output is noise)")
    ap.add_argument("--demo", action="store_true",
                    help="serve a tiny model with random weights on the CPU, with a demo voice and the built-in page: "
                         "no HF_TOKEN or GPU needed (its output is noise, not speech)")
    add_model_args(ap)
    return ap


def demo_argv(argv: list[str]) -> list[str]:
    """`--demo`'s flags before the user's own (which win): the tiny demo model on the CPU, its
    voice directory and voice, two sessions."""
    from ..demo import DEMO_VOICE, demo_model, demo_model_args

    paths = demo_model()
    return [*demo_model_args(paths), "--voice-prompt-dir", str(paths["voices"]), "--voice-prompt", DEMO_VOICE,
            "--max-sessions", "2", *argv]


def check_cpu_serving(args, device) -> None:
    """A 7B-sized model on the CPU cannot keep up with real time: it runs there only when
    `--device cpu` asks for it by name (checked before anything is fetched: without --config,
    PersonaPlex and Moshi are both 7Bs)."""
    if device.type != "cpu" or args.device == "cpu":
        return
    from engine.config import PERSONAPLEX_7B, load_config
    from engine.lm import LM, count_parameters

    params = count_parameters(LM((load_config(args.config) if args.config else PERSONAPLEX_7B).lm, device="meta"))
    if params > 1e9:
        raise UserError(f"no CUDA GPU is visible, and a model of {params / 1e9:.1f} B parameters does not run in real "
                        f"time on the CPU (an 80 ms frame takes seconds there): pass --device cpu to serve it anyway, "
                        f"or serve the tiny demo model with `ppx-serve --demo`")


def check_limits(args) -> None:
    for name in ("tick_deadline_ms", "max_backlog_seconds", "burst_seconds", "client_buffer_seconds"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be above 0 (got {getattr(args, name)})")
    if args.idle_timeout < 0:
        raise UserError(f"--idle-timeout must be 0 (never) or more (got {args.idle_timeout})")
    if args.frontends < 1:
        raise UserError(f"--frontends must be at least 1 (got {args.frontends})")
    if args.max_sessions is not None and args.max_sessions < 1:
        raise UserError(f"--max-sessions must be at least 1 (got {args.max_sessions})")


def voice_dir(args, cfg):
    """The voice directory, checked (and fetched from the hub when none is given) before the
    model loads; the default voice must be in it. None for a Moshi checkpoint, which takes no
    voice (nor a role prompt: either flag is refused)."""
    from pathlib import Path

    from voices import VoiceLibrary, hub_voice_dir

    if cfg.moshi:
        given = [f for f, v in (("--voice-prompt", args.voice_prompt), ("--voice-prompt-dir", args.voice_prompt_dir),
                                ("--text-prompt", args.text_prompt if args.text_prompt != DEFAULT_TEXT_PROMPT
                                 else None)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: this Moshi checkpoint takes no voice or role prompt (it starts every "
                            f"conversation from its initial tokens)")
        return None

    d = Path(args.voice_prompt_dir) if args.voice_prompt_dir else hub_voice_dir(args.hf_repo)
    library = VoiceLibrary(d)
    if args.voice_prompt is not None:
        library.find(args.voice_prompt)
    return d


# sessions one Python process kept in real time, all their host work in it (an H200's 16-core host)
ONE_PROCESS_SESSIONS = 64


def run(args, argv: list[str] | None = None) -> int:
    """Serves on this process; with --frontends N the sessions' websocket and codec work runs in
    N processes started with `argv` (this process's flags)."""
    import torch

    from ..common import resolve_device
    from .server import Server

    check_limits(args)
    device = resolve_device(args.device)
    check_cpu_serving(args, device)
    cfg = model_config(args)
    if device.type == "cpu":
        threads = step_threads(args)
        torch.set_num_threads(threads)
        log.info("the step runs on the CPU with %d torch thread(s) beside %d codec thread(s) on %d core(s)",
                 threads, args.codec_threads, cpu_cores())
    voices = voice_dir(args, cfg)
    engine = load_engine(args, cfg, max_slots=args.max_sessions)
    args.max_sessions = engine.max_slots
    if args.frontends == 1 and args.max_sessions > ONE_PROCESS_SESSIONS:
        log.info("up to %d sessions with their websocket and codec work in this one process, which kept %d in "
                 "real time on a 16-core host but not 128: --frontends %d spreads that work", args.max_sessions,
                 ONE_PROCESS_SESSIONS, -(-args.max_sessions // ONE_PROCESS_SESSIONS))
    if args.frontends > 1:
        from .frontends import run_core

        return run_core(args, argv, engine, voices, cache_dir(), str(engine.tokenizer.path))
    server = Server(engine, args, voices, cache_dir())
    asyncio.run(server.serve())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging(tag=args.log_tag)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per session is ours

    def body() -> int:
        nonlocal args, argv
        if args.core_address:
            from .frontends import run_frontend

            return run_frontend(args)
        if args.demo:
            given = [f for f in ("moshi_weight", "mimi_weight", "tokenizer", "config") if getattr(args, f)]
            if given or args.random_weights:
                raise UserError("--demo serves its own tiny model: drop --" + (given[0].replace("_", "-") if given
                                                                                 else "random-weights"))
            argv = demo_argv(argv)
            args = build_parser().parse_args(argv)
            log.warning("DEMO: a tiny model with random weights on the CPU; its output is noise, not speech "
                        "(the real model: set HF_TOKEN and run on a GPU without --demo)")
        if args.gpus is not None:
            from .placement import run_front

            check_limits(args)
            voice_dir(args, model_config(args))
            return run_front(build_parser(), args)
        return run(args, argv)

    return run_main(body)
