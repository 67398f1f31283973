"""`dgx-emu serve`: the node behind an OpenAI-compatible HTTP endpoint (uvicorn + launch/openai_api.py).

    dgx-emu serve [--model DIR] [--world-size N] [--device cpu|cuda] [--host 127.0.0.1] [--port 8000]
                  [--api-key KEY] [--max-batch 16] [--max-queue 64] [every node option of `generate`]

Start-up order, so that every user error costs no node start: the flags are checked, the
address is bound (a port in use or a bad host is refused here, with exit code 2), the
checkpoint's config, layout, tokenizer and chat template are read; only then do the ranks start
and load. When the server accepts requests it prints one line with its address (with --port 0,
the port the system picked), which scripts and tests wait for. Ctrl-C or SIGTERM stops
accepting, gives open requests a few seconds, closes the scheduler and with it the node, and
exits with 130 or 143.

BackgroundServer runs the same uvicorn server in a thread, for tests and tools that serve and
call in one process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from cluster.node import UserError, build_node
from launch.run_args import add_runtime_args, node_settings
from launch.serve_text import ChatTemplate, ChatTemplateError
from launch.spec_cli import check_spec
from launch.trace_cli import finish_trace_dir

GRACEFUL_SHUTDOWN_S = 5


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (continuous batching)")
    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (the ready line says which)")
    g.add_argument("--api-key", default=os.environ.get("DGX_EMU_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DGX_EMU_API_KEY, else no key)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint directory's name)")
    g.add_argument("--max-batch", type=int, default=16, help="requests decoding at once")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s")
    g.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens prefilled per step and request")
    g.add_argument("--spec-max-batch", type=int, default=None, metavar="N",
                   help="with EAGLE-3: decode plainly while more than N requests decode at once, until the batch "
                        "empties (default: always speculate)")
    g.add_argument("--max-chat-tokens", type=int, default=None,
                   help="chat completions without max_tokens stop after this many (default: the rest of the context)")
    g.add_argument("--token-timeout", type=float, default=120.0,
                   help="seconds a running request waits for its next token before it fails with 503")
    g.add_argument("--queue-timeout", type=float, default=600.0,
                   help="seconds a request waits for its first token (queue included) before it fails with 503")
    g.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    add_runtime_args(p)


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds (without listening: until the server starts, connections are refused, not left hanging)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"--host {host}: {e.strerror or e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn_server(app, log_level: str, on_ready=None):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(app, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return Server(config)


class BackgroundServer:
    """uvicorn serving `app` in a daemon thread on 127.0.0.1 (port 0: a free one); `url` once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = _uvicorn_server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="dgx-emu-serve")

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the HTTP server did not stop within {timeout_s} s")


@contextlib.contextmanager
def _sigterm_exits():
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again; by default that kills
    the process before the scheduler and the node are closed. This makes it a SystemExit (code
    143) that runs the cleanup on its way out."""
    def exit_143(signum, frame):
        raise SystemExit(128 + signum)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, exit_143)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _check_flags(args) -> None:
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                               ("--prefill-chunk", args.prefill_chunk, 1),
                               ("--spec-max-batch", 1 if args.spec_max_batch is None else args.spec_max_batch, 1)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if args.max_chat_tokens is not None and args.max_chat_tokens < 1:
        raise UserError(f"--max-chat-tokens must be >= 1, got {args.max_chat_tokens}")
    for flag, value in (("--token-timeout", args.token_timeout), ("--queue-timeout", args.queue_timeout)):
        if not value > 0:
            raise UserError(f"{flag} must be > 0 s, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty")


def served_model(model_dir: Path, model_cfg, max_context: int | None, name: str | None):
    """The tokenizer and chat template of a checkpoint, checked before any rank starts."""
    from launch.openai_api import ServedModel
    from model.tokenizer import Tokenizer

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json: serve needs one to turn text into tokens")
    template = ChatTemplate.for_checkpoint(model_dir)
    try:
        template.render([{"role": "user", "content": "hi"}])
    except ChatTemplateError as e:
        raise UserError(str(e)) from None
    return ServedModel(name=name or model_dir.name, tokenizer=Tokenizer.from_file(tokenizer_file),
                       chat_template=template, bos_token_id=model_cfg.bos_token_id,
                       max_context=max_context or model_cfg.max_position_embeddings, created=int(time.time()))


def start_backend(args):
    """Everything before HTTP: the node started and loaded, a Scheduler over it, the served model.
    Returns (scheduler, served, options); the scheduler owns the node (close() shuts it down)."""
    from cluster.scheduler import Scheduler
    from launch.openai_api import ServeOptions
    from model.config import load_model_config

    settings = node_settings(args)
    if args.spec_max_batch is not None and settings.spec is None:
        raise UserError("--spec-max-batch switches speculative decoding off above a batch size; it needs a draft "
                        "(drop --no-spec)")
    run = settings.run
    served = served_model(settings.model_dir, load_model_config(settings.model_dir), run.max_context,
                          args.served_model_name)
    build = {**settings.build_kwargs, "max_restarts": 0}  # the scheduler restarts: it knows the requests
    if args.replicas != 1:  # N copies of the node behind this endpoint (cluster/replicas.py)
        from cluster.replicas import start_replicas
        check_spec(settings.spec, settings.draft_path, settings.model_dir, load_model_config(settings.model_dir))
        scheduler = start_replicas(run, args.replicas, build, dict(
            max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
            max_restarts=args.max_restarts, spec=settings.spec, spec_max_batch=args.spec_max_batch),
            log=lambda line: print(line, file=sys.stderr))
        return scheduler, dataclasses.replace(served, max_context=scheduler.max_context), ServeOptions(
            api_key=args.api_key, token_timeout_s=args.token_timeout, first_token_timeout_s=args.queue_timeout,
            default_chat_max_tokens=args.max_chat_tokens)
    node = build_node(run, **build)
    try:
        check_spec(settings.spec, settings.draft_path, settings.model_dir, node.model_cfg)
        reports = node.load()
        print(f"loaded {run.world_size} rank(s) in {max(r['load_s'] for r in reports):.1f} s", file=sys.stderr)
        kwargs = dict(max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                      max_restarts=args.max_restarts, make_node=lambda: build_node(run, **build))
        scheduler = Scheduler(node, spec=settings.spec, spec_max_batch=args.spec_max_batch, **kwargs)
    except BaseException:
        node.shutdown()
        raise
    served = dataclasses.replace(served, max_context=scheduler.max_context)
    options = ServeOptions(api_key=args.api_key, token_timeout_s=args.token_timeout,
                           first_token_timeout_s=args.queue_timeout,
                           default_chat_max_tokens=args.max_chat_tokens)
    return scheduler, served, options


def run_serve(args) -> int:
    from launch.openai_api import create_app

    _check_flags(args)
    sock = bind_socket(args.host, args.port)
    try:
        scheduler, served, options = start_backend(args)
    except BaseException:
        sock.close()
        raise
    try:
        ready = (f"serving {served.name} at {url_of(sock)}/v1 (world size {args.world_size}, "
                 f"max batch {args.max_batch}, chat template: {served.chat_template.origin})")
        server = _uvicorn_server(create_app(scheduler, served, options), args.log_level,
                                 on_ready=lambda: print(ready, flush=True))
        with _sigterm_exits():
            server.run(sockets=[sock])
    finally:  # also after Ctrl-C / SIGTERM
        scheduler.close()
        sock.close()
        if args.trace:  # the ranks wrote their timelines when the node closed
            traced = finish_trace_dir(args.trace)
            print(f"trace: {traced['dir']} (dgx-emu trace summary {traced['dir']})", file=sys.stderr)
    return 0
