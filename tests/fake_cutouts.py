"""A local stand-in for the Legacy Surveys cutout service (127.0.0.1 only, started by the tests).

It answers ``/viewer/cutout.fits?ra=..&dec=..&size=64&layer=ls-dr10&pixscale=0.262&bands=grz`` with a
FITS cube (3, 64, 64) of the stamp the simulator rendered for that position (an all-zero cube, as the
real service gives outside the footprint, for an unknown position), and injects faults per position:
a list of faults consumed one per request (then it answers normally), or a persistent one.

Faults: ``slow`` (sleeps ``slow_s`` before answering), ``500``, ``503`` (with Retry-After), ``429``
(with ``Retry-After: 1``), ``truncated`` (Content-Length of the whole file, half the body, then the
connection closes), ``truncated_nolength`` (half a file, no Content-Length), ``drop`` (closes the
connection without an answer), ``wrong_shape`` (a (1, 64, 64) cube), ``all_zero``, ``404``, ``half_zero``
(the left half of every band zero: a partial overlap with the coadds), ``dribble`` (the answer one byte every
0.5 s) and ``hang`` (no answer for 60 s).

``files`` serves other files of the release by URL path, e.g. Tractor catalogues at
``/tractor/<AAA>/tractor-<brick>.fits`` (404 for any other path under ``/tractor/``); ``file_requests`` lists
the paths asked for.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
from astropy.io import fits

from darkhaloscope.stamps.contract import BANDS, mag_to_nanomaggy


def key_of(ra, dec) -> tuple[str, str]:
    """The position as the client formats it (7 decimals), so that a value and its formatted string agree."""
    return (f"{float(ra):.7f}", f"{float(dec):.7f}")


def fits_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(image, np.float32)).writeto(buf)
    return buf.getvalue()


class _QuietServer(ThreadingHTTPServer):
    """A client closing its connection (a dropped keep-alive, a retry after a timeout) is normal for a web service:
    not printed to stderr, where the tests read the command's own one-line messages."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FakeCutoutService:
    def __init__(self, images: dict, faults: dict | None = None, persistent: dict | None = None,
                 slow_s: float = 1.5, delay_s: float = 0.0, files: dict | None = None):
        self.images = {key_of(*k): v for k, v in images.items()}
        self.faults = {key_of(*k): list(v) for k, v in (faults or {}).items()}
        self.persistent = {key_of(*k): v for k, v in (persistent or {}).items()}
        self.slow_s = slow_s
        self.delay_s = delay_s
        self.requests: list[tuple[tuple[float, float], float, dict]] = []
        self.files = dict(files or {})
        self.file_requests: list[str] = []
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                service.handle(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def count(self, ra, dec) -> int:
        k = key_of(ra, dec)
        return sum(1 for r in self.requests if r[0] == k)

    def times(self, ra, dec) -> list[float]:
        k = key_of(ra, dec)
        return [r[1] for r in self.requests if r[0] == k]

    # --------------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        if url.path.startswith("/tractor/"):
            with self.lock:
                self.file_requests.append(url.path)
            body = self.files.get(url.path)
            return self._send(h, 200, body) if body is not None else self._send(h, 404, b"not found")
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/viewer/cutout.fits" or "ra" not in q or "dec" not in q:
            return self._send(h, 400, b"bad request")
        k = key_of(q["ra"], q["dec"])
        with self.lock:
            self.requests.append((k, time.monotonic(), q))
            queue = self.faults.get(k)
            fault = queue.pop(0) if queue else self.persistent.get(k)
        if self.delay_s:
            time.sleep(self.delay_s)
        image = self.images.get(k)
        if image is None:
            image = np.zeros((len(BANDS), 64, 64), np.float32)
        body = fits_bytes(image)
        if fault == "slow":
            time.sleep(self.slow_s)
        elif fault in ("500", "404"):
            return self._send(h, int(fault), b"server error")
        elif fault == "503":
            return self._send(h, 503, b"busy", {"Retry-After": "1"})
        elif fault == "429":
            return self._send(h, 429, b"slow down", {"Retry-After": "1"})
        elif fault == "drop":
            h.close_connection = True
            h.connection.close()
            return
        elif fault == "truncated":
            h.send_response(200)
            h.send_header("Content-Type", "application/fits")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.close()
            return
        elif fault == "truncated_nolength":
            h.send_response(200)
            h.send_header("Content-Type", "application/fits")
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        elif fault == "wrong_shape":
            body = fits_bytes(image[:1])
        elif fault == "all_zero":
            body = fits_bytes(np.zeros_like(image))
        elif fault == "half_zero":
            half = np.array(image, np.float32, copy=True)
            half[:, :, : half.shape[2] // 2] = 0.0
            body = fits_bytes(half)
        elif fault == "hang":
            time.sleep(60)
            return
        elif fault == "dribble":
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            try:
                for i in range(len(body)):
                    h.wfile.write(body[i:i + 1])
                    h.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
            return
        self._send(h, 200, body, {"Content-Type": "application/fits"})

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


def simulated_sky(n: int, seed: int = 0, control_frac: float = 1.0, psf_model: str = "moffat"):
    """(catalogue table in the Tractor convention, {(ra, dec): simulator stamp}, manifest rows dict).

    The catalogue's ``psfdepth_*`` are inverse variances (1/nmgy^2) that convert back to the manifest's
    5-sigma depths: ivar = 1 / (f5 / 5)^2 with f5 the 5-sigma flux in nanomaggies."""
    from darkhaloscope.simulation.manifest import build_manifest
    from darkhaloscope.simulation.scene import column_arrays, render_scenes

    table = build_manifest(n, seed, control_frac=control_frac)
    rows = column_arrays(table)
    batch = render_scenes(rows, psf_model, 3.5)
    cat = {"objid": pa.array([f"obj{int(t):05d}" for t in rows["task_id"]], pa.string()),
           "ra": rows["ra"], "dec": rows["dec"]}
    for b in BANDS:
        cat[f"psfsize_{b}"] = rows[f"psfsize_{b}"]
    for b in BANDS:
        cat[f"psfdepth_{b}"] = 1.0 / (mag_to_nanomaggy(rows[f"psfdepth_{b}"]) / 5.0) ** 2
    images = {(ra, dec): img for ra, dec, img in zip(rows["ra"], rows["dec"], batch.image)}
    return pa.table(cat), images, rows, batch


def serve_catalogue(catalog: str, url_file: str, control_frac: float = 0.7, seed: int = 0) -> None:
    """Serve simulator stamps at every position of a catalogue (parquet with ra/dec, any case) until killed:
    row i gets the i-th scene of ``simulated_sky`` (a fraction 1 - ``control_frac`` of them lensed). The base URL
    is written to ``url_file`` once the server listens (docs/real_sky.md's walk-through uses this)."""
    import os
    import signal

    import pyarrow.parquet as pq

    table = pq.read_table(catalog)
    names = {n.lower(): n for n in table.column_names}
    ra = table.column(names["ra"]).to_numpy()
    dec = table.column(names["dec"]).to_numpy()
    _, scenes, _, _ = simulated_sky(len(ra), seed=seed, control_frac=control_frac)
    images = {(r, d): img for r, d, img in zip(ra, dec, scenes.values())}
    with FakeCutoutService(images) as svc:
        tmp = f"{url_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(svc.base_url + "\n")
        os.replace(tmp, url_file)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="a local stand-in for the Legacy Surveys cutout service")
    parser.add_argument("--catalog", required=True, help="parquet with ra, dec: the positions to serve")
    parser.add_argument("--url_file", required=True, help="the base URL is written here once it listens")
    parser.add_argument("--control_frac", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    serve_catalogue(a.catalog, a.url_file, a.control_frac, a.seed)
