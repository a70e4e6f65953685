"""An SMTP server for the fault tests: records each message it accepted, and can hold a client mid-session."""

from __future__ import annotations

import socketserver
import threading


class Sink(socketserver.ThreadingTCPServer):
    """Accepts every message; `hold_at_mail=N` makes the N-th MAIL FROM wait until `release()` (or forever)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hold_at_mail: int | None = None):
        super().__init__(("127.0.0.1", 0), _Session)
        self.accepted: list[list[str]] = []  # the recipients of each message accepted (250 after DATA)
        self.mails = 0
        self.hold_at_mail = hold_at_mail
        self.holding = threading.Event()
        self._released = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def release(self) -> None:
        self.hold_at_mail = None
        self._released.set()

    def close(self) -> None:
        self.release()
        self.shutdown()
        self.server_close()


class _Session(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(f"{line}\r\n".encode())
        self.wfile.flush()

    def handle(self):
        sink: Sink = self.server
        recipients: list[str] = []
        self.reply("220 faults-sink ESMTP")
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250-faults-sink\r\n250 8BITMIME")
            elif verb == b"MAIL":
                with sink.lock:
                    sink.mails += 1
                    hold = sink.hold_at_mail is not None and sink.mails >= sink.hold_at_mail
                if hold:
                    sink.holding.set()
                    sink._released.wait()
                recipients = []
                self.reply("250 OK")
            elif verb == b"RCPT":
                recipients.append(line.decode().split(":", 1)[1].strip().strip("<>"))
                self.reply("250 OK")
            elif verb == b"DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                with sink.lock:
                    sink.accepted.append(recipients)
                self.reply("250 accepted")
            elif verb == b"QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 OK")
