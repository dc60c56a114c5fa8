"""Traces: an OTLP/HTTP receiver started here gets router and shard spans sharing a trace id."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conftest import Server, free_port

SMALL = ("--max-input-tokens", "128", "--max-total-tokens", "256", "--max-batch-prefill-tokens", "256")


class Receiver:
    def __init__(self):
        self.spans: list[tuple[str, str, str]] = []  # (service, span name, trace id)
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            spans.append((service, sp.name, sp.trace_id.hex()))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_router_and_shard_spans_share_a_trace():
    rx = Receiver()
    s = Server(*SMALL, "--otlp-endpoint", f"http://127.0.0.1:{rx.port}", "--otlp-service-name", "tessera-it").wait_ready()
    try:
        r = requests.post(s.url("/generate"), json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200
        wanted = {"request", "prefill", "decode", "shard.step"}
        end = time.time() + 15
        while time.time() < end:  # spans arrive in batches, every 500 ms from each process
            router = {t for svc, name, t in rx.spans if svc == "tessera-it" and name == "request"}
            shard = {t for svc, name, t in rx.spans if svc == "tessera-it.shard" and name.startswith("shard.")}
            if router & shard and wanted <= {name for _, name, _ in rx.spans}:
                break
            time.sleep(0.2)
        assert router, rx.spans
        assert shard, rx.spans
        assert router & shard, rx.spans
        assert wanted <= {name for _, name, _ in rx.spans}
    finally:
        s.stop()
        rx.close()
