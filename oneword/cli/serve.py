"""``ti serve``: the personalization service over HTTP; ``ti serve keys add NAME --keys FILE``.

    ti serve                                               # the toy world on 127.0.0.1:8000
    ti serve --model sd15 --encoder enc.safetensors --keys keys.txt --host 0.0.0.0
    ti serve keys add alice --keys keys.txt                # prints alice's key once
    ti serve --ray auto --db postgresql://... --blobs s3://bucket/oneword --replicas 2   # on Ray Serve

The library side is :mod:`oneword.serve`; the API is documented at /docs while it runs.
"""

from __future__ import annotations

import logging
import sys

from oneword.cli.options import add_dataclass_options, new_parser
from oneword.errors import OneWordError

HELP = "serve word learning and generation over HTTP (FastAPI); ti serve keys add NAME --keys FILE"


def build_parser(prog: str = "ti serve"):
    from oneword.serve.config import ServeSettings

    p = new_parser(
        prog,
        "Serve many users' words on one model: POST photos to /v1/words and get a provisional word "
        "within about a second and the refined one when the group engine is done; draw images with "
        "POST /v1/images. State lives in --data (SQLite and content-addressed files): a restarted "
        "server continues every accepted job. API documentation at http://HOST:PORT/docs.",
    )
    p.add_argument(
        "action", nargs="*", default=[], metavar="keys add NAME", help="make an API key (see --keys)"
    )
    p.add_argument(
        "--model", default=None, help="diffusion model (default: the encoder's; toy with the toy encoder)"
    )
    p.add_argument("--encoder", default=None, help="encoder file (default: toy, the shipped toy encoder)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="weights' dtype on the device"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (without --keys: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--keys",
        dest="keys_file",
        default=None,
        metavar="FILE",
        help="API keys file ('NAME sha256:HEX' lines; make keys with ti serve keys add NAME --keys FILE); "
        "each key is a tenant that sees only its own jobs and words",
    )
    ray = p.add_argument_group("Ray Serve (the ray-serve extra)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="deploy on Ray Serve: the same API at --host:--port, one worker replica per GPU (a CPU "
        "replica without GPUs); ADDRESS is a cluster (auto, ray://HOST:10001), or nothing for a local "
        "Ray instance. Give every replica the same store: --db postgresql://... and --blobs URL",
    )
    ray.add_argument("--replicas", type=int, default=1, help="worker replicas to start with (with --ray)")
    ray.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="scale worker replicas up to this many on the queue depth, one per --group words (with --ray)",
    )
    add_dataclass_options(p, ServeSettings)
    return p


def run(args) -> int:
    if args.action:
        return _keys(args)
    import dataclasses
    import socket

    from oneword.serve.config import ServeSettings
    from oneword.serve.server import check_binding, load_world, serve
    from oneword.serve.service import Service

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)}
    given["owner"] = given["owner"] or f"{socket.gethostname()}:{args.port}"
    try:
        settings = ServeSettings(**given)
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from None
    if settings.blobs:  # reachable before anything is made or loaded
        from oneword.serve.blobs import Blobs

        try:
            Blobs(settings.blobs)
        except ValueError as err:
            raise OneWordError(f"--blobs: {err}") from None
    keys = check_binding(args.host, args.keys_file)  # before the model loads
    _json_logs()
    if args.ray is not None:
        return _ray(args, given)
    world, model_name = load_world(args.model, args.encoder, args.device, args.mixed_precision)
    service = Service(world, settings, keys, model_name)
    logging.getLogger("oneword.serve").info(
        "serving %s on http://%s:%d (API docs at /docs; data in %s)",
        model_name,
        args.host,
        args.port,
        settings.data,
    )
    return serve(service, args.host, args.port)


def _ray(args, settings: dict) -> int:
    from pathlib import Path

    from oneword.serve.blobs import is_url

    if args.ray == "local":  # a local instance serves this machine only: its sockets on loopback
        import os  # (Ray reads this documented switch when it is imported)

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    settings = dict(settings)  # replicas may start in other folders
    settings["data"] = str(Path(settings["data"]).resolve())
    if settings["blobs"] and not is_url(settings["blobs"]):
        settings["blobs"] = str(Path(settings["blobs"]).resolve())
    try:
        from oneword.serve import ray_app
    except ImportError as err:
        raise OneWordError(f"--ray needs Ray Serve ({err}): pip install 'oneword[ray-serve]'") from None
    given = {"model": args.model, "encoder": args.encoder, "device": args.device,
             "mixed_precision": args.mixed_precision, "keys": args.keys_file, "replicas": args.replicas,
             "max_replicas": args.max_replicas, "settings": settings}  # fmt: skip
    try:
        ray_app.Options.parse(given)
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from None
    return ray_app.run(None if args.ray == "local" else args.ray, given, args.host, args.port)


def _keys(args) -> int:
    from oneword.serve.auth import add_key

    if len(args.action) != 3 or args.action[:2] != ["keys", "add"]:
        raise OneWordError(
            f"unknown action {' '.join(args.action)!r}; the one action is: ti serve keys add NAME --keys FILE"
        )
    if not args.keys_file:
        raise OneWordError("give the keys file: ti serve keys add NAME --keys FILE")
    key = add_key(args.keys_file, args.action[2])
    print(f"API key of {args.action[2]} (shown only now; {args.keys_file} keeps its hash):", file=sys.stderr)
    print(key)
    return 0


def _json_logs() -> None:
    """One JSON object per log line on stderr (the request lines carry their request id)."""
    import json
    import time

    class Json(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            message = record.getMessage()
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                    "level": record.levelname.lower(), "logger": record.name}  # fmt: skip
            try:
                parsed = json.loads(message) if message.startswith("{") else None
            except ValueError:
                parsed = None
            line.update(parsed if isinstance(parsed, dict) else {"message": message})
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
            return json.dumps(line)

    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(Json())
