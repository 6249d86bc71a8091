"""A local OTLP/HTTP trace receiver for the tests: decodes each `POST /v1/traces` with the
official OpenTelemetry protobuf definitions (`opentelemetry-proto`) and appends one JSON line per
span to a file: its ids (hex), parent, name, kind, attributes, status and the resource's
`service.name`, with the request's headers.

    python3 otlp_receiver.py PORT_FILE SPANS_FILE [--hang | --fail | --huge | --redirect | --idle-close]

It listens on a free loopback port and writes that port to PORT_FILE. `--hang` takes requests
and never answers; `--fail` answers 503 to every one; `--huge` answers 200 with a body of a
gibibyte, sent for as long as the gateway reads it. `--redirect` answers 307 to another path of
its own, and notes a request that follows it as a line `{"followed": ...}`. `--idle-close`
closes a kept-alive connection after a second without a request, as a load balancer does,
without saying so in its answers.
"""

import json
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

MODE = sys.argv[3] if len(sys.argv) > 3 else ""
LOCK = threading.Lock()


def value(v: common_pb2.AnyValue):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # StreamRequestHandler puts it on the socket: a connection idle that long is closed.
    timeout = 1.0 if MODE == "--idle-close" else None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.do_POST()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if MODE == "--redirect":
            if self.path == "/elsewhere":
                with LOCK, open(sys.argv[2], "a") as f:
                    f.write(json.dumps({"followed": self.command}) + "\n")
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:%d/elsewhere" % self.server.server_address[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if MODE == "--hang":
            time.sleep(3600)
            return
        if MODE == "--huge":
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            chunk = b"\x0a" * 65536
            try:
                for _ in range((1 << 30) // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass
            return
        if MODE == "--fail":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        lines = []
        for rs in req.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                        "status": s.status.code,
                        "flags": s.flags,
                        "trace_state": s.trace_state,
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "scope_version": ss.scope.version,
                        "content_type": self.headers.get("Content-Type"),
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }))
        with LOCK, open(sys.argv[2], "a") as f:
            for line in lines:
                f.write(line + "\n")
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True


server = Server(("127.0.0.1", 0), Receiver)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os  # noqa: E402

os.replace(sys.argv[1] + ".tmp", sys.argv[1])
server.serve_forever()
