"""Many processes for `eval`: the items sharded across processes, one ordered output (lm-eval's data-parallel).

Two ways in, one mechanism (torch.distributed with the gloo backend, which carries Python objects between CPU
and GPU processes alike):
- `accelerate launch -m probllm eval ...` or `torchrun --nproc-per-node N -m probllm eval ...`: the launcher sets
  RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; each process picks up its shard from them (on GPUs,
  process i uses cuda:LOCAL_RANK).
- `probllm eval --num-processes N ...`: this process becomes process 0 and starts N-1 copies of itself with
  those variables set (CPU threads split between them).

Every process reads the same records (so they must come from files, or from stdin spooled to a file by
`--num-processes`), scores every N-th batch of each window, and process 0 gathers the window's predictions and
writes them in input order: the output is the same records, in the same order, as one process writes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from probllm.io import UsageError, log


SPOOLED_STDIN = "PROBLLM_EVAL_SPOOLED_STDIN"  # set for the processes --num-processes starts: stdin is a file copy


def stdin_is_shared() -> bool:
    """Whether every process of this run reads the same stdin (a copy spooled by --num-processes)."""
    return os.environ.get(SPOOLED_STDIN) == "1"


@dataclass
class Shard:
    rank: int
    world: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, results: dict) -> dict:
        """Every process's {index: prediction} merged on process 0 (empty elsewhere)."""
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, results)
        if not self.is_main:
            return {}
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged

    def broadcast(self, obj):
        """Process 0's value of `obj`, in every process."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard_from_env() -> Shard | None:
    """The shard this process runs, when a launcher (accelerate, torchrun, --num-processes) started several."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        # gloo: Python objects (the predictions) travel between processes whatever the model's device.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=4))
    return Shard(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


class Workers:
    """`--num-processes N`: start N-1 copies of this command as processes 1..N-1; this one is process 0."""

    def __init__(self, n: int, argv: list[str], reads_stdin: bool):
        import torch

        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise UsageError("--num-processes: already started by a launcher (accelerate/torchrun); use one or the other")
        self.n = n
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="probllm-eval-")
        stdin_file = None
        if reads_stdin:
            # Every process reads the same records: stdin is spooled to a file that each one reads as its stdin.
            stdin_file = Path(self.tmp.name, "stdin")
            with open(stdin_file, "wb") as fh:
                while True:
                    block = sys.stdin.buffer.read(1 << 20)
                    if not block:
                        break
                    fh.write(block)
            sys.stdin = open(stdin_file, encoding="utf-8", newline="\n")
        threads = max(1, (os.cpu_count() or 1) // n)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n),
               "OMP_NUM_THREADS": str(threads)}
        argv = _without_option(argv, "--num-processes")
        for rank in range(1, n):
            log_path = Path(self.tmp.name, f"rank{rank}.log")
            self.logs.append(log_path)
            with open(log_path, "wb") as err:
                stdin = open(stdin_file, "rb") if stdin_file else subprocess.DEVNULL
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "probllm", *argv], stdin=stdin, stdout=subprocess.DEVNULL, stderr=err,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), SPOOLED_STDIN: "1" if stdin_file else ""}))
                if stdin_file:
                    stdin.close()
        os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")})
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0"})
        torch.set_num_threads(threads)

    def close(self, failed: bool) -> None:
        """Wait for the other processes (stop them if this one failed); report any that failed."""
        for rank, proc in enumerate(self.procs, 1):
            try:
                if failed:
                    proc.terminate()
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code and code not in (-15, 130, 143):
                tail = self.logs[rank - 1].read_text(errors="replace").strip().splitlines()[-3:]
                log(f"probllm eval: process {rank} failed (exit {code}): " + " | ".join(tail))
        for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            os.environ.pop(k, None)
        self.tmp.cleanup()
