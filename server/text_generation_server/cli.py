"""`text-generation-server`: `serve` one shard, or `prepare-model` to resolve a model id (the
default, a local directory, a hub repository) to a model directory, downloading or converting it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from text_generation_server import env
from text_generation_server.models.config import ConfigError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


log = logging.getLogger("text_generation_server")


class UsageError(Exception):
    """A problem the operator must fix (bad flag, missing model, busy socket): logged without a traceback."""


def resolve_model(model_id: str | None, revision: str | None = None) -> Path:
    """A model directory: the embedded default (converted once), a local directory, or a hub
    repository id downloaded into the hub cache."""
    from text_generation_server.weights import default_model, hub

    if default_model.is_default(model_id):
        if not revision:
            return default_model.prepare_default_model()
        if model_id != default_model.DEFAULT_MODEL_ID:
            raise UsageError(f"--revision {revision} applies to hub model ids; the embedded default model has none")
    path = Path(model_id).expanduser()
    if path.is_dir():
        if revision:
            raise UsageError(f"--revision {revision} applies to hub model ids, but {model_id} is a local directory")
        return path.resolve()
    if not hub.is_repo_id(model_id):
        raise UsageError(f"model {model_id!r} is neither a local directory nor a hub repository id (org/name)")
    try:
        return hub.download(model_id, revision)
    except hub.HubError as e:
        raise UsageError(str(e)) from e


def claim_socket(path: str) -> None:
    """Removes a stale socket file at `path`; refuses one a live server listens on (another
    instance started with the same --uds-path), whose clients would otherwise be taken over."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise UsageError(f"{path} exists and is not a socket; pass another --uds-path / --shard-uds-path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
        except OSError:
            pass
    raise UsageError(f"{path} is in use by another running server (another Tessera instance?); "
                     f"give each instance its own --uds-path / --shard-uds-path")


class JsonFormatter(logging.Formatter):
    """One JSON record per line, which the launcher re-emits at its level (traceback included)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    if env.log_json():
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=env.log_level(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings.warn(...) as WARNING records
    for noisy in ("httpx", "httpx2", "httpcore", "filelock"):  # one line per hub request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def excepthook(kind, value, tb):
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    sys.excepthook = excepthook


def _serve(args: argparse.Namespace) -> None:
    import torch

    from text_generation_server.engine import Engine, EngineConfig
    from text_generation_server.server import serve

    from text_generation_server import tracing

    from text_generation_server.parallel import init_group

    tracing.setup(args.otlp_endpoint, args.otlp_service_name, args.rank)
    torch.set_grad_enabled(False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", args.rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if not 0 <= args.rank < args.world_size:
        raise UsageError(f"--rank {args.rank} is not within --world-size {args.world_size}")
    dtype_name = DTYPES.get(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if dtype_name is None:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    uds = f"{args.uds_path}-{args.rank}"
    claim_socket(uds)  # before loading anything: a busy path fails fast
    graphs = tuple(int(x) for x in args.cuda_graphs.split(",") if x.strip() and int(x) > 0)
    adapters = []
    for item in filter(None, (x.strip() for x in (args.lora_adapters or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora-adapters entries are name=path, got {item!r}")
        adapters.append((name, Path(path)))
    if device.type == "cpu" and args.world_size > 1:  # the ranks share the cores instead of each taking all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    model_dir = resolve_model(args.model_id)
    group = init_group(args.rank, args.world_size, args.master_addr, args.master_port, device,
                       env.collective_timeout())
    engine = Engine(EngineConfig(model_dir=model_dir, dtype=getattr(torch, dtype_name), group=group,
                                 device=device, block_size=args.block_size,
                                 cuda_memory_fraction=args.cuda_memory_fraction, attention=args.attention,
                                 cuda_graphs=graphs, lora_adapters=tuple(adapters),
                                 adapter_source=Path(args.adapter_source) if args.adapter_source else None,
                                 max_active_adapters=args.max_active_adapters, max_lora_rank=args.max_lora_rank))
    claim_socket(uds)  # again: another instance may have taken it while we loaded
    paths = [f"{args.uds_path}-{r}" for r in range(args.world_size)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(serve(engine, uds, paths))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logging.getLogger(__name__).info("shard %d stopping", args.rank)
        finally:
            tracing.shutdown()

    asyncio.run(main())


def parser() -> argparse.ArgumentParser:
    """The command line. The launcher passes every `serve` flag it shares with it explicitly;
    integration-tests/test_tgi_command_line.py checks that their defaults agree."""
    p = argparse.ArgumentParser(prog="text-generation-server")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve one shard over gRPC on a unix socket")
    s.add_argument("model_id", nargs="?", default=None, help="model directory (default: the embedded default model)")
    s.add_argument("--uds-path", default="/tmp/tessera-server", help="socket path prefix; the shard appends -RANK")
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--world-size", type=int, default=1, help="tensor-parallel ranks (shards of one model)")
    s.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address of the tensor-parallel group")
    s.add_argument("--master-port", type=int, default=29500, help="rendezvous port (rank 0 listens on it)")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
    s.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--cuda-memory-fraction", type=float, default=0.9)
    s.add_argument("--cuda-graphs", default="1,2,4,8,16,32,48,64,96,128,160,192,224,256,320,384,448,512",
                   help="decode batch sizes captured as CUDA graphs (comma list; 0 disables)")
    s.add_argument("--attention", default=None, choices=["torch", "flashinfer"], help="force an attention backend")
    s.add_argument("--lora-adapters", default="", help="name=path,... PEFT adapters known at start")
    s.add_argument("--adapter-source", default=None, help="directory of adapters loadable by name")
    s.add_argument("--max-active-adapters", type=int, default=8, help="adapters resident at once (LRU)")
    s.add_argument("--max-lora-rank", type=int, default=64,
                   help="largest adapter rank on CUDA (the device slot table is padded to it)")
    s.add_argument("--otlp-endpoint", default=None, help="OTLP/HTTP collector for traces")
    s.add_argument("--otlp-service-name", default="tessera")
    m = sub.add_parser("prepare-model", help="print the model directory for an id, converting the default once")
    m.add_argument("model_id", nargs="?", default=None)
    m.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub model id")
    return p


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            _serve(args)
        else:
            print(resolve_model(args.model_id, args.revision))
    except (UsageError, ConfigError) as e:
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
