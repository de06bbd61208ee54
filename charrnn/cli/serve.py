"""`charrnn serve`: serve runs over HTTP (the API, the OpenAI-style completions endpoint, the page); docs/serve.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import HOME, Device, RunDevice
from charrnn.errors import DataError

NEEDS = "charrnn serve needs FastAPI and uvicorn: pip install \"charrnn[serve]\""


@handle_errors
def serve(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run folders (or exported folders, or checkpoint files) to serve, each named by its folder \\[default: every run under --dir].", show_default=False)] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on (0: any free one).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 serves other machines too.")] = "127.0.0.1",
    max_length: Annotated[int, typer.Option(min=1, help="Most characters one sample may generate.")] = 2000,
    max_num: Annotated[int, typer.Option(min=1, help="Most samples one request may ask for.")] = 8,
    max_prime: Annotated[int, typer.Option(min=1, help="Most characters of prime (a text to trace or score may have this plus --max-length).")] = 4000,
    max_streams: Annotated[int, typer.Option(min=1, help="Most samples generated at once, over all requests (more: HTTP 429).")] = 64,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads of the model steps \\[default: PyTorch's; on a busy machine 1 can be much faster].", show_default=False)] = None,
    device: RunDevice = Device.cpu,
    dir: Annotated[Path, typer.Option("--dir", help="Where runs live, when none is named.")] = HOME,
):
    """Serve models over HTTP: a JSON API, OpenAI-style /v1/completions, and a page at / to write, steer
    and see the sentiment unit. Generation requests for one model share one batched step loop."""
    try:
        import uvicorn

        from charrnn.serve.app import Limits, create_app
    except ImportError:
        raise DataError(NEEDS) from None
    from charrnn import ui
    from charrnn.serve.models import find_runs, load_models

    sock = listen(host, port)  # first: a port in use fails before the models load
    port = sock.getsockname()[1]  # the one chosen, for --port 0
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        models = load_models(find_runs(runs or [], dir), device.value, on_warn=ui.warn)
        app = create_app(models, Limits(max_length=max_length, max_num=max_num, max_prime=max_prime,
                                        max_streams=max_streams))
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    show = f"[{host}]" if ":" in host else host
    ui.info(f"serving {', '.join(models)} at http://{show}:{port}/ (API docs at /docs; Ctrl-C stops)")
    server.run(sockets=[sock])


def listen(host: str, port: int):
    """The listening socket, bound here so that a port in use is one line (and --port 0 says which it got)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DataError(f"cannot listen on {host} port {port} ({e.strerror}); choose another with --port "
                        "(0: any free one) or --host") from None
    sock.listen(2048)
    return sock
