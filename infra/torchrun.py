"""torchrun: the command that launches a training module, and its single-node stores on 127.0.0.1 only.

torch's TCPStore listens on every interface, and torchrun has no option to change that: a
single-node training run would open two ports to the network for as long as it runs. A store
created with `master_listen_fd` serves on a socket bound by the caller instead, so here every
store the agent hosts on a loopback address gets a socket bound to 127.0.0.1.

`python -m infra.torchrun ARGS` takes exactly torchrun's arguments.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Protocol

from infra.processes import is_loopback


class TorchrunSettings(Protocol):
    """What the launch needs of the train params (lmforge.config.TrainConfig)."""

    nproc_per_node: int
    nnodes: int
    max_restarts: int
    rdzv_endpoint: str  # host:port; port 0 on a single node picks a free one
    rdzv_id: str
    threads_per_rank: int
    strategy: str  # ddp | fsdp


def torchrun_command(cfg: TorchrunSettings, module: str) -> list[str]:
    """`python -m infra.torchrun ... -m module`: torchrun with a single node's stores on loopback."""
    cmd = [
        sys.executable, "-m", "infra.torchrun",
        f"--nproc-per-node={cfg.nproc_per_node}", f"--max-restarts={cfg.max_restarts}",
    ]  # fmt: skip
    if cfg.nnodes == 1:
        cmd += (
            ["--standalone", "--local-addr=127.0.0.1"]
            if cfg.rdzv_endpoint.endswith(":0")
            else ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"]
        )
    else:
        cmd += [
            f"--nnodes={cfg.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--rdzv-id={cfg.rdzv_id}",
        ]
    return cmd + ["-m", module]


def torchrun_env(cfg: TorchrunSettings, cuda: bool) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(cfg.threads_per_rank),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cfg.nnodes == 1 and not cuda:  # keep single-node gloo on loopback
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    if cfg.strategy == "fsdp" and not cuda:
        # FSDP gathers each block's weights into a fresh buffer and frees it, block after block. glibc
        # raises its mmap threshold to the largest block freed, then serves them from its heap, which it
        # never gives back: the rank's memory grows to DDP's and sharding saves nothing. A fixed threshold
        # returns every buffer over 1 MiB to the OS, at some speed (measured in `lmforge bench`).
        env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    if cfg.nnodes > 1:
        # A shared agent store needs keys per restart attempt, and each agent counts its own restarts:
        # after one node's rank dies the nodes' counts differ, and the restarted workers never meet
        # (pytorch#135712). With this, rank 0's worker hosts a fresh store every round.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# the launcher process: torch is imported only here, not by the command builders above

_listening: list[socket.socket] = []  # the stores serve on these: they live as long as the agent
_TCPStore: Any = None  # torch's own class, set by patch_stores


def loopback_store(host_name: str, port: int = 0, *args: Any, **kwargs: Any):
    if kwargs.get("is_master") and is_loopback(host_name) and kwargs.get("master_listen_fd") is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port or 0))
        except OSError as exc:
            sock.close()
            # Another agent on this machine hosts the store already (two nodes on one host): torch's
            # c10d rendezvous retries as a client on a RuntimeError.
            raise RuntimeError(f"127.0.0.1:{port} is taken ({exc.strerror}): not the store's host") from exc
        sock.listen(4096)
        _listening.append(sock)
        host_name, port, kwargs["master_listen_fd"] = "127.0.0.1", sock.getsockname()[1], sock.fileno()
    return _TCPStore(host_name, port, *args, **kwargs)


def patch_stores() -> None:
    global _TCPStore
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    if _TCPStore is None:
        _TCPStore = dist.TCPStore
    # the c10d rendezvous backend imported the class by name; the dynamic rendezvous uses dist.TCPStore
    c10d_rendezvous_backend.TCPStore = loopback_store
    dist.TCPStore = loopback_store


if __name__ == "__main__":
    from torch.distributed.run import main

    patch_stores()
    main()
