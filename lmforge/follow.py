"""`lmforge serve --follow`: serve the champion, and switch to each new one without a restart.

This process runs `bentoml serve` of the champion's Bento as a child and reads the champion record every
few seconds. When it names another Bento (a promotion, a rollback), it brings that Bento into the local
store (from S3 if need be) and writes its model tag and chat template to a small JSON file. Each worker
watches that file (lmforge/serving/models.py): it loads the new model beside the old one, sends new
requests to it, lets the requests in flight finish on the old one, and frees it. The service code and
the serving limits stay those of the Bento the server started with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from infra.atomic import write_text_atomic
from infra.errors import LmforgeError
from infra.processes import bin_path
from lmforge.config import Params
from lmforge.serving.settings import FOLLOW_VAR
from lmforge.workspace import Workspace


def champion_model(ws: Workspace, params: Params) -> dict | None:
    """The champion's Bento and model as the follow file names them; None when there is no champion."""
    import bentoml

    from lmforge.runs.registry import read_champion
    from pipeline.package import ensure_local_bento

    champion = read_champion(params.storage, ws.state)
    if champion is None or not champion.bento_tag:
        return None
    ensure_local_bento(ws, params, champion.bento_tag, champion.bento_url)
    info = bentoml.get(champion.bento_tag).info
    return {"bento_tag": champion.bento_tag, "model_tag": info.labels["model_tag"],
            "chat_template": info.args.get("chat_template")}  # fmt: skip


def serve_following(
    ws: Workspace, params: Params, host: str, port: int, interval: float, say: Callable[[str], None]
) -> int:
    """Serve until interrupted; returns the server's exit code."""
    wanted = champion_model(ws, params)
    if wanted is None:
        raise LmforgeError("there is no champion Bento yet: run `lmforge run` first")
    follow_file = ws.state / "serve" / f"follow-{port}.json"
    write_text_atomic(follow_file, json.dumps(wanted))
    env = dict(os.environ, **{FOLLOW_VAR: str(follow_file)})
    cmd = [bin_path("bentoml"), "serve", wanted["bento_tag"], "--host", host, "--port", str(port)]
    server = subprocess.Popen(cmd, env=env)
    say(
        f"serving {wanted['bento_tag']} on http://{host}:{port}, following the champion (every {interval:g} s)"
    )

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while server.poll() is None:
            try:
                server.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                now = champion_model(ws, params)
            except LmforgeError as exc:  # S3 down for a moment: keep serving what is served
                say(f"cannot read the champion ({exc}); still serving {wanted['model_tag']}")
                continue
            if now is not None and now["model_tag"] != wanted["model_tag"]:
                say(
                    f"champion is now {now['bento_tag']}: switching from {wanted['model_tag']} to {now['model_tag']}"
                )
                write_text_atomic(follow_file, json.dumps(now))
                wanted = now
    except KeyboardInterrupt:
        pass
    finally:
        _stop(server)
        Path(follow_file).unlink(missing_ok=True)
    return server.returncode or 0


def _stop(server: subprocess.Popen, grace: float = 30) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
