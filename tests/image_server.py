"""A local HTTP server for image-download tests: serves a folder on 127.0.0.1 under
/rope/images/, and misbehaves on cue for given file names.

  server = FlakyServer(served_dir)      # started in a thread
  server.prefix                         # http://127.0.0.1:PORT/rope/images/
  server.script[name] = ["500", "500"]  # answers used up one request at a time,
  server.always[name] = "404"           # then this one (default "ok")
  server.requests[name]                 # monotonic times of the requests for name
  server.delay = 0.1                    # seconds added to every response
  server.stop()

Answers: ok, 404, 403, 500, 429 / 503 (with Retry-After: 1), slow (`slow_seconds`
late), truncated (Content-Length larger than the body sent, then hang up), html (a 200
with an HTML page), reset (a TCP reset instead of an answer).
"""

import collections
import http.server
import os
import socket
import struct
import threading
import time
import urllib.parse

SERVED_PATH = "/rope/images/"


# --- the server --------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, as real image servers
  disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls

  def log_message(self, *args):  # quiet
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server.owner
    if not self.path.startswith(SERVED_PATH):
      self._send(404, b"no such path", "text/plain")
      return
    name = urllib.parse.unquote(self.path[len(SERVED_PATH):])
    action = server.next_action(name)
    if server.delay:
      time.sleep(server.delay)
    path = os.path.join(server.served_dir, name)
    if action in ("404", "403", "500"):
      self._send(int(action), b"<html>error</html>", "text/html")
    elif action in ("429", "503"):
      self._send(int(action), b"slow down", "text/plain", {"Retry-After": "1"})
    elif action == "html":
      self._send(200, b"<!DOCTYPE html><html><body>Sorry, not found</body></html>",
                 "text/html")
    elif action == "reset":  # RST instead of an answer
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
      self.connection.close()
      self.close_connection = True
    elif not os.path.isfile(path):
      self._send(404, b"not found", "text/plain")
    else:
      with open(path, "rb") as f:
        data = f.read()
      if action == "slow":
        time.sleep(server.slow_seconds)
      if action == "truncated":  # promises more than it sends, then hangs up
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data) + 500))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.close_connection = True
        return
      self._send(200, data, "image/jpeg")

  def _send(self, status, body, content_type, headers=None):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    self.end_headers()
    self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # clients that gave up (timeouts, resets) are expected here


class FlakyServer:
  """Serves `served_dir`; `script[name]` is a list of actions used up one request at a
  time, then `always[name]` (default "ok") answers."""

  def __init__(self, served_dir):
    self.served_dir = served_dir
    self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    self.httpd.owner = self
    self._lock = threading.Lock()
    self.reset()
    self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self._thread.start()

  def reset(self):
    with self._lock:
      self.script = {}
      self.always = {}
      self.requests = collections.defaultdict(list)  # name -> [monotonic time]
      self.delay = 0.0
      self.slow_seconds = 1.5  # the slow test's --timeout is 0.5 s

  def next_action(self, name):
    with self._lock:
      self.requests[name].append(time.monotonic())
      queued = self.script.get(name)
      return queued.pop(0) if queued else self.always.get(name, "ok")

  @property
  def prefix(self):
    return f"http://127.0.0.1:{self.httpd.server_address[1]}{SERVED_PATH}"

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()
