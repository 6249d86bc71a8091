"""A webhook receiver for tests/notify.rs: verifies every delivery with the Standard Webhooks
reference library (`standardwebhooks`) and writes one JSON line per delivery to a file.

    python3 webhook_receiver.py PORT OUT_FILE SECRET [DOCS_SNIPPET_FILE]

A POST to /slack is recorded as it came (Slack's shape is not signed). Any other POST is
verified with SECRET; a delivery that fails verification is recorded with "verified": false
and answered 400. With DOCS_SNIPPET_FILE (the check docs/operations.md shows, as printed), it
is run too, with `secret`, `headers` and `body` bound, and its verdict recorded as
"verified_by_docs".
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PORT, OUT, SECRET = int(sys.argv[1]), sys.argv[2], sys.argv[3]
HOOK = Webhook(SECRET)
DOCS = open(sys.argv[4]).read() if len(sys.argv) > 4 else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        line = {"path": self.path, "body": json.loads(body)}
        status = 204
        if self.path != "/slack":
            headers = {k.lower(): v for k, v in self.headers.items()}
            line["id"] = headers.get("webhook-id")
            try:
                HOOK.verify(body, headers)
                line["verified"] = True
            except WebhookVerificationError as e:
                line["verified"] = False
                line["error"] = str(e)
                status = 400
            if DOCS is not None:
                try:
                    exec(DOCS, {"secret": SECRET, "headers": headers, "body": body})
                    line["verified_by_docs"] = True
                except AssertionError:
                    line["verified_by_docs"] = False
        with open(OUT, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
