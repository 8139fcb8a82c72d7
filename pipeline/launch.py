"""torchrun, with a single-node run's rendezvous stores listening on 127.0.0.1 only.

torch's TCPStore listens on every interface, and torchrun has no option to change that: a
single-node training run would open two ports to the network for as long as it runs. A store
created with `master_listen_fd` serves on a socket bound by the caller instead, so here every
store the agent hosts on a loopback address gets a socket bound to 127.0.0.1.

`python -m pipeline.launch ARGS` takes exactly torchrun's arguments.
"""

from __future__ import annotations

import socket
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend
from torch.distributed.run import main

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_TCPStore = dist.TCPStore
_listening: list[socket.socket] = []  # the stores serve on these: they live as long as the agent


def loopback_store(host_name: str, port: int = 0, *args: Any, **kwargs: Any) -> dist.TCPStore:
    if kwargs.get("is_master") and host_name in LOOPBACK_HOSTS and kwargs.get("master_listen_fd") is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port or 0))
        sock.listen(4096)
        _listening.append(sock)
        host_name, port, kwargs["master_listen_fd"] = "127.0.0.1", sock.getsockname()[1], sock.fileno()
    return _TCPStore(host_name, port, *args, **kwargs)


def patch_stores() -> None:
    # the c10d rendezvous backend imported the class by name; the dynamic rendezvous uses dist.TCPStore
    c10d_rendezvous_backend.TCPStore = loopback_store
    dist.TCPStore = loopback_store


if __name__ == "__main__":
    patch_stores()
    main()
