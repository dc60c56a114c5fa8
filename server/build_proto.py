"""Generate the gRPC stubs from ../proto into text_generation_server/pb (never committed)."""

import re
import sys
from pathlib import Path

from grpc_tools import protoc

root = Path(__file__).resolve().parent
proto_dir = root.parent / "proto" / "v2"
out = root / "text_generation_server" / "pb"
out.mkdir(exist_ok=True)
args = ["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}", f"--pyi_out={out}",
        f"--grpc_python_out={out}", str(proto_dir / "generate.proto")]
if protoc.main(args) != 0:
    sys.exit("protoc failed")
grpc_file = out / "generate_pb2_grpc.py"
text = re.sub(r"^import generate_pb2", "from . import generate_pb2", grpc_file.read_text(), flags=re.M)
# The stubs use nothing newer than grpcio 1.60 (pyproject's floor); don't refuse older runtimes.
text = re.sub(r"^GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '1.60.0'", text, flags=re.M)
grpc_file.write_text(text)
(out / "__init__.py").write_text("")
print(f"generated stubs in {out}")
