"""`text-generation-server`: `serve` one shard, or `prepare-model` to resolve a model id to a directory."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from text_generation_server import env

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def resolve_model(model_id: str | None) -> Path:
    from text_generation_server.weights import default_model

    if default_model.is_default(model_id):
        return default_model.prepare_default_model()
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path.resolve()
    raise SystemExit(f"model {model_id!r} is not a local directory (this build serves local model directories "
                     f"and the embedded default; no hub access)")


def _serve(args: argparse.Namespace) -> None:
    import torch

    from text_generation_server.engine import Engine, EngineConfig
    from text_generation_server.server import serve

    from text_generation_server import tracing

    tracing.setup(args.otlp_endpoint, args.otlp_service_name, args.rank)
    torch.set_grad_enabled(False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", args.rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    dtype_name = DTYPES.get(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if dtype_name is None:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    graphs = tuple(int(x) for x in args.cuda_graphs.split(",") if x.strip() and int(x) > 0)
    adapters = []
    for item in filter(None, (x.strip() for x in (args.lora_adapters or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-adapters entries are name=path, got {item!r}")
        adapters.append((name, Path(path)))
    engine = Engine(EngineConfig(model_dir=resolve_model(args.model_id), dtype=getattr(torch, dtype_name),
                                 device=device, block_size=args.block_size,
                                 cuda_memory_fraction=args.cuda_memory_fraction, attention=args.attention,
                                 cuda_graphs=graphs, lora_adapters=tuple(adapters),
                                 adapter_source=Path(args.adapter_source) if args.adapter_source else None,
                                 max_active_adapters=args.max_active_adapters, max_lora_rank=args.max_lora_rank))
    uds = f"{args.uds_path}-{args.rank}"
    if os.path.exists(uds):
        os.unlink(uds)
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=env.log_level(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="text-generation-server")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve one shard over gRPC on a unix socket")
    s.add_argument("model_id", nargs="?", default=None, help="model directory (default: the embedded default model)")
    s.add_argument("--uds-path", default="/tmp/tessera-server", help="socket path prefix; the shard appends -RANK")
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--world-size", type=int, default=1)
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
    args = p.parse_args(argv)
    if args.cmd == "serve":
        _serve(args)
    else:
        print(resolve_model(args.model_id))


if __name__ == "__main__":
    main()
