"""Running the service: load the model and encoder, start uvicorn, drain on SIGTERM.

On SIGTERM (or Ctrl-C) the service first drains: readiness turns false, new words and images get
503, the worker stops at a step boundary and checkpoints every running word; then uvicorn stops
(open event streams end). Everything is bounded by ``drain_seconds``; a second signal exits at
once. Jobs that were running continue from their checkpoints when the server starts again.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from pathlib import Path

from oneword.errors import OneWordError
from oneword.serve.auth import Keys
from oneword.serve.service import Service
from oneword.serve.worker import World

logger = logging.getLogger("oneword.serve")


def load_world(
    model_name: str | None, encoder_name: str | None, device: str | None, mixed_precision: str = "no"
) -> tuple[World, str]:
    """The frozen model, the encoder (the shipped toy encoder by default) and the refinement
    settings, as ``ti-encode --refine`` uses them; returns the world and the model's name."""
    from oneword.encoder.model import TRAIN_ONE, check_fits, load_encoder
    from oneword.encoder.pipeline import REFINE_DEFAULTS, encoder_identity, encoder_path
    from oneword.inversion.config import InversionConfig, weights_dtype
    from oneword.models import load_model

    path = encoder_path(encoder_name)
    encoder, meta = load_encoder(path), encoder_identity(path)
    model_name = model_name or encoder.cfg.model
    if encoder.cfg.family == "toy" and model_name != "toy" and not Path(model_name).is_dir():
        raise OneWordError(
            f"{path} is an encoder for the toy world, not for --model {model_name}: {TRAIN_ONE}"
        )
    model = load_model(model_name, device=device, dtype=weights_dtype(mixed_precision))
    check_fits(encoder, model)
    encoder.to(model.device)
    encoder.space.to(model.device)
    cfg = InversionConfig(
        template="toy" if model.family == "toy" else "object",
        num_vectors=encoder.cfg.num_vectors,
        base_lr=REFINE_DEFAULTS["base_lr"],
        mixed_precision=mixed_precision,
    )
    return World(model, encoder, meta, cfg), model_name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, keys_file: str | None) -> Keys | None:
    """The keys, or None; without keys only a loopback address is allowed."""
    if keys_file:
        return Keys.load(keys_file)
    if not is_loopback(host):
        raise OneWordError(
            f"without --keys the server listens on loopback only, not {host}: anyone who can reach it "
            "could use it. Make keys with: ti serve keys add NAME --keys keys.txt"
        )
    logger.warning("no --keys: one tenant, no authentication, listening on %s only", host)
    return None


def serve(service: Service, host: str, port: int, log_level: str = "info") -> int:
    """Run the app until SIGTERM/Ctrl-C drains it; returns the exit status (0 after a drain in time)."""
    import uvicorn

    from oneword.serve.app import create_app

    app = create_app(service)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level=log_level,
        access_log=False,  # the app logs each request as JSON, with its id
        timeout_graceful_shutdown=max(1, int(service.settings.drain_seconds)),
    )
    server = _DrainingServer(config, service)
    server.run()
    return 0 if server.drained_in_time else 1


class _DrainingServer:
    """uvicorn's server with a first signal that drains before it stops (see the module docstring)."""

    def __init__(self, config, service: Service) -> None:
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                outer._signal(sig)

        self.server = Server(config)
        self.service = service
        self.drained_in_time = True
        self._draining: threading.Thread | None = None

    def _signal(self, sig) -> None:
        if self._draining is not None:  # the second signal: now
            self.server.force_exit = True
            self.server.should_exit = True
            return
        logger.warning("signal %s: draining (again to stop at once)", signal.Signals(sig).name)

        def drain() -> None:
            self.drained_in_time = self.service.drain()
            self.server.should_exit = True

        self._draining = threading.Thread(target=drain, name="oneword-drain", daemon=True)
        self._draining.start()

    def run(self) -> None:
        self.server.run()
